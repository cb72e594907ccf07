"""RoPE tables for ``fa_fused``: rotate-half (NeoX) cos/sin as HF Qwen3's rotary embedding computes them."""

import torch

__all__ = ["rope_cos_sin"]


def rope_cos_sin(max_position: int, head_dim: int, rope_theta: float = 1e6,
                 dtype: torch.dtype = torch.float32, device=None) -> tuple:
    """Rotate-half RoPE tables [max_position, head_dim], computed as HF Qwen3's rotary embedding does.

    ``inv_freq = 1 / theta^(2i / head_dim)``; ``freqs = position * inv_freq`` in fp32;
    ``cos = cos(cat(freqs, freqs))``, likewise ``sin``. Qwen3 checkpoints use theta = 1e6.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (rope_theta ** exponents)
    freqs = torch.outer(torch.arange(max_position, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)
