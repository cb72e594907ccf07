"""The physical blocks of a paged KV cache: a free list shared by the rows of all layers, and the block table
that says which blocks each row owns."""

from typing import Sequence

import torch

from ..paged import slots_of

__all__ = ["BlockAllocator", "BlockTable", "OutOfBlocksError"]


class OutOfBlocksError(RuntimeError):
    """The block pool cannot hold a step's tokens. Raised before anything is allocated or written."""


class BlockAllocator:
    """Free list over the physical block ids ``[0, num_blocks)``; freed blocks are reused first."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ...

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list:
        """``count`` block ids, all or none."""
        if count > len(self._free):
            raise OutOfBlocksError(f"need {count} blocks, {len(self._free)} of {self.num_blocks} are free")
        if count <= 0:
            return []
        taken = self._free[-count:][::-1]
        del self._free[-count:]
        return taken

    def free(self, blocks: Sequence[int]) -> None:
        self._free.extend(reversed(blocks))

    def grow(self, num_blocks: int) -> None:
        """Adds the ids ``[self.num_blocks, num_blocks)``, handed out after the already free ones."""
        self._free[:0] = range(num_blocks - 1, self.num_blocks - 1, -1)
        self.num_blocks = num_blocks


class BlockTable:
    """Which physical blocks each row of a batch owns, in logical order, and the int32 table
    ``[rows, max_blocks]`` that ``fa_fused`` reads (columns past a row's blocks hold 0 and are never read).

    Blocks come from, and go back to, a ``BlockAllocator``; the pools that hold their contents are the cache's.
    """

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.rows: list = []
        self.tensor = torch.zeros(0, 1, dtype=torch.int32)

    def __len__(self) -> int:
        return len(self.rows)

    def to(self, device) -> None:
        self.tensor = self.tensor.to(device)

    def reset(self, batch: int) -> None:
        """``batch`` rows holding no block."""
        self.rows = [[] for _ in range(batch)]
        self._rebuild()

    def missing_blocks(self, lengths: Sequence[int]) -> list:
        """Blocks each row lacks to hold ``lengths[row]`` tokens (0 where it has enough)."""
        return [max(-(-length // self.block_size) - len(blocks), 0) for length, blocks in zip(lengths, self.rows)]

    def grow(self, missing: Sequence[int], allocator: BlockAllocator) -> list:
        """Gives each row ``missing[row]`` more blocks (the allocator must have them); returns [(row, block)]."""
        added = []
        for row, count in enumerate(missing):
            for block in allocator.allocate(count):
                self.rows[row].append(block)
                added.append((row, block))
        if added:
            self._rebuild()
        return added

    def undo(self, added: Sequence[tuple], allocator: BlockAllocator) -> None:
        """Returns the blocks ``grow`` handed out."""
        for row, block in reversed(added):
            self.rows[row].remove(block)
            allocator.free([block])
        self._rebuild()

    def truncate(self, lengths: Sequence[int], allocator: BlockAllocator) -> None:
        """Keeps just the blocks that ``lengths[row]`` tokens need; frees the rest."""
        for row, length in enumerate(lengths):
            keep = -(-length // self.block_size)
            allocator.free(self.rows[row][keep:])
            del self.rows[row][keep:]
        self._rebuild()

    def copies_needed(self, index: Sequence[int]) -> tuple:
        """For ``select(index)``: (blocks the repeated rows need as copies, blocks the dropped rows free)."""
        taken, copies = set(), 0
        for row in index:
            if row in taken:
                copies += len(self.rows[row])
            taken.add(row)
        freed = sum(len(blocks) for row, blocks in enumerate(self.rows) if row not in taken)
        return copies, freed

    def select(self, index: Sequence[int], allocator: BlockAllocator) -> tuple:
        """New row i = old row index[i]: a row taken once keeps its blocks, a repeated one gets fresh blocks
        (the allocator must have ``copies_needed(index)[0]`` of them, counting the dropped rows' blocks).
        Returns (sources, targets): the physical blocks whose contents the cache must copy."""
        owner, repeated = {}, []
        for new_row, old_row in enumerate(index):
            if old_row in owner:
                repeated.append((new_row, old_row))
            else:
                owner[old_row] = new_row
        for row, blocks in enumerate(self.rows):
            if row not in owner:
                allocator.free(blocks)
        new_rows = [None] * len(index)
        for old_row, new_row in owner.items():
            new_rows[new_row] = self.rows[old_row]
        sources, targets = [], []
        for new_row, old_row in repeated:
            fresh = allocator.allocate(len(self.rows[old_row]))
            sources += self.rows[old_row]
            targets += fresh
            new_rows[new_row] = fresh
        self.rows = new_rows
        self._rebuild()
        return sources, targets

    def slots(self, logical: torch.Tensor) -> torch.Tensor:
        """Flat pool slot (``block * block_size + offset``) of logical token indices [rows, n] (each >= 0, within
        the row's blocks)."""
        return slots_of(self.tensor.to(logical.device), logical, self.block_size)

    def _rebuild(self) -> None:
        # Its width grows with the rows: dynamic to torch.compile from the start (a compiled layer is not recompiled
        # when a row takes one more block), and at least 2 (compile specializes sizes 0 and 1).
        width = max([len(blocks) for blocks in self.rows] + [2])
        table = torch.zeros(len(self.rows), width, dtype=torch.int32)
        for row, blocks in enumerate(self.rows):
            if blocks:
                table[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        self.tensor = table.to(self.tensor.device)
        torch._dynamo.maybe_mark_dynamic(self.tensor, 1)
