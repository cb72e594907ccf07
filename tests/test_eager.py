"""The eager backend's pieces on hand-computed values (the whole op is checked against the fp64 reference in
test_ops.py)."""

import torch

import torch_qwen_fused
from torch_qwen_fused.backends import eager


def test_pieces_named_after_the_math():
    x = torch.tensor([[[3.0, 4.0, 0.0, 0.0]]])
    torch.testing.assert_close(eager.rms_norm(x, torch.ones(4), eps=0.0), x / 2.5)
    torch.testing.assert_close(eager.rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])),
                               torch.tensor([-3.0, -4.0, 1.0, 2.0]))
    # Position 0 is the identity rotation.
    cos, sin = torch_qwen_fused.rope_cos_sin(4, 4)
    torch.testing.assert_close(eager.apply_rope(x, cos, sin, torch.tensor([0])), x)


def test_default_slot_mapping_follows_the_block_table():
    block_table = torch.tensor([[7, 2, -1], [4, 9, 1]], dtype=torch.int32)
    seq_lens = torch.tensor([5, 9], dtype=torch.int32)
    # block size 4: row 0's token 4 is offset 0 of logical block 1 (physical 2); row 1's token 8 is
    # offset 0 of logical block 2 (physical 1).
    assert eager.default_slot_mapping(block_table, seq_lens, 4).tolist() == [8, 4]
    assert eager.default_positions(seq_lens).tolist() == [4, 8]


def test_varlen_defaults_follow_the_context():
    # Row 0: 5 tokens of which the last 2 are new (context indices 3, 4); row 1: 9 tokens, 1 new (index 8).
    seq_lens = torch.tensor([5, 9], dtype=torch.int32)
    query_start_loc = torch.tensor([0, 2, 3], dtype=torch.int32)
    assert eager.token_rows(seq_lens, query_start_loc).tolist() == [0, 0, 1]
    assert eager.context_indices(seq_lens, query_start_loc).tolist() == [3, 4, 8]
    block_table = torch.tensor([[7, 2, -1], [4, 9, 1]], dtype=torch.int32)
    # block size 4: index 3 -> block 7 offset 3 = 31; index 4 -> block 2 offset 0 = 8; index 8 -> block 1 = 4.
    assert eager.default_varlen_slot_mapping(block_table, seq_lens, query_start_loc, 4).tolist() == [31, 8, 4]
