"""The paged cache's index arithmetic (torch_qwen_fused.paged) on hand-computed values."""

import torch

from torch_qwen_fused import paged


def test_default_slot_mapping_follows_the_block_table():
    block_table = torch.tensor([[7, 2, -1], [4, 9, 1]], dtype=torch.int32)
    seq_lens = torch.tensor([5, 9], dtype=torch.int32)
    # block size 4: row 0's token 4 is offset 0 of logical block 1 (physical 2); row 1's token 8 is
    # offset 0 of logical block 2 (physical 1).
    assert paged.default_slot_mapping(block_table, seq_lens, 4).tolist() == [8, 4]
    assert paged.default_positions(seq_lens).tolist() == [4, 8]


def test_varlen_defaults_follow_the_context():
    # Row 0: 5 tokens of which the last 2 are new (context indices 3, 4); row 1: 9 tokens, 1 new (index 8).
    seq_lens = torch.tensor([5, 9], dtype=torch.int32)
    query_start_loc = torch.tensor([0, 2, 3], dtype=torch.int32)
    assert paged.token_rows(seq_lens, query_start_loc).tolist() == [0, 0, 1]
    assert paged.context_indices(seq_lens, query_start_loc).tolist() == [3, 4, 8]
    block_table = torch.tensor([[7, 2, -1], [4, 9, 1]], dtype=torch.int32)
    # block size 4: index 3 -> block 7 offset 3 = 31; index 4 -> block 2 offset 0 = 8; index 8 -> block 1 = 4.
    assert paged.default_varlen_slot_mapping(block_table, seq_lens, query_start_loc, 4).tolist() == [31, 8, 4]
