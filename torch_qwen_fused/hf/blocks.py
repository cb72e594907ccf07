"""The physical blocks of a paged KV cache: a free list shared by the rows of all layers."""

from typing import Sequence

__all__ = ["BlockAllocator", "OutOfBlocksError"]


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
