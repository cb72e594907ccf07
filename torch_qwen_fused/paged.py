"""The paged cache's index arithmetic of the contract (docs/contract.md, sections 2 and 8), shared by the backends
written in Python, the fp64 reference and the tests: which row a new token belongs to, its context index, and the
defaults of ``positions`` and ``slot_mapping``. A slot is ``block * block_size + offset``.
"""

import torch

__all__ = ["slots_of", "default_positions", "default_slot_mapping", "token_rows", "context_indices",
           "default_varlen_slot_mapping"]


def slots_of(block_table: torch.Tensor, logical: torch.Tensor, block_size: int) -> torch.Tensor:
    """[rows, n] int64: the flat slot of each row's logical token indices ``logical`` [rows, n] (each >= 0, within
    the row's blocks): ``block_table[row, index // block_size] * block_size + index % block_size``."""
    return block_table.long().gather(1, logical // block_size) * block_size + logical % block_size


def default_positions(seq_lens: torch.Tensor) -> torch.Tensor:
    """The new token's RoPE position when none is given: the last index of its context."""
    return seq_lens.long() - 1


def default_slot_mapping(block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat cache slot (``block * block_size + offset``) of each row's last context token."""
    return slots_of(block_table, (seq_lens.long() - 1).unsqueeze(1), block_size).squeeze(1)


def token_rows(seq_lens: torch.Tensor, query_start_loc: torch.Tensor) -> torch.Tensor:
    """[T] int64: the row of each new token (row b's are tokens query_start_loc[b] .. query_start_loc[b + 1] - 1)."""
    counts = query_start_loc[1:].long() - query_start_loc[:-1].long()
    return torch.repeat_interleave(torch.arange(seq_lens.shape[0], device=seq_lens.device), counts)


def context_indices(seq_lens: torch.Tensor, query_start_loc: torch.Tensor) -> torch.Tensor:
    """[T] int64: the context index of each new token, ``seq_lens[b] - n_b + i`` for row b's i-th of n_b (the
    new tokens are the last of the row's context). Also their default RoPE positions."""
    rows = token_rows(seq_lens, query_start_loc)
    counts = query_start_loc[1:].long() - query_start_loc[:-1].long()
    index_in_row = torch.arange(rows.shape[0], device=rows.device) - query_start_loc[:-1].long()[rows]
    return seq_lens.long()[rows] - counts[rows] + index_in_row


def default_varlen_slot_mapping(block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                                block_size: int) -> torch.Tensor:
    """Flat cache slot of each new token: its context index through its row of the block table."""
    rows = token_rows(seq_lens, query_start_loc)
    index = context_indices(seq_lens, query_start_loc)
    return slots_of(block_table[rows], index.unsqueeze(1), block_size).squeeze(1)
