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
