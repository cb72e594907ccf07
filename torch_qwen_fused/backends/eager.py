"""The eager backend of ``qwen::fa_fused`` and ``qwen::fa_fused_varlen``: plain PyTorch, one function per step
of the math (docs/contract.md, sections 1 and 8). It runs on any device torch runs on: it is the op's kernel on every
device without one of its own (CUDA, MPS, XPU, ...) and ``backend="eager"`` of the Python API.
"""

import math
from typing import Optional

import torch

from ..paged import context_indices, default_positions, default_slot_mapping, default_varlen_slot_mapping

__all__ = [
    "rms_norm",
    "rotate_half",
    "apply_rope",
    "quantize",
    "write_cache",
    "gather_context",
    "paged_attention",
    "attend",
    "fa_fused_eager",
    "fa_fused_varlen_eager",
]

# The same function serves backend="eager" and every device without a kernel; the CPU and the NPU
# (PrivateUse1) have dedicated kernels, which take precedence over this registration.
_REGISTRATION_KEY = "CompositeExplicitAutograd"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head RMSNorm over the last dim, in fp32: ``x * rsqrt(mean(x^2) + eps) * w``."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half: ``[x1, x2] -> [-x2, x1]`` over the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x`` [T, H, D] at ``positions`` [T], with rotate-half tables [max_pos, D], in fp32."""
    cos_at = cos[positions].float().unsqueeze(1)  # only the batch's rows of the table are read
    sin_at = sin[positions].float().unsqueeze(1)
    return x.float() * cos_at + rotate_half(x.float()) * sin_at


def quantize(x: torch.Tensor, dtype: torch.dtype, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """``x / scale`` rounded (to nearest even) to a cache dtype; fp8 saturates to its finite range, so an overflow
    stores the largest value, never Inf or NaN (a NaN stays NaN)."""
    x = x.float() if scale is None else x.float() / scale
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        limit = torch.finfo(dtype).max
        x = x.clamp(-limit, limit)
    return x.to(dtype)


def write_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                slot_mapping: torch.Tensor, k_scale: Optional[torch.Tensor] = None,
                v_scale: Optional[torch.Tensor] = None) -> None:
    """Write k, v [T, Hkv, D] into the paged caches at flat slots; a slot of -1 skips its token. Indexed by (block,
    offset), not through a flat view: blocks may lie further apart than their size (contract, section 5)."""
    block_size = k_cache.shape[1]
    rows = slot_mapping >= 0
    slots = slot_mapping[rows]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = quantize(k[rows], k_cache.dtype, k_scale)
    v_cache[blocks, offsets] = quantize(v[rows], v_cache.dtype, v_scale)


def gather_context(cache: torch.Tensor, blocks: torch.Tensor, seq_len: int,
                   scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The first ``seq_len`` tokens [seq_len, Hkv, D] of one row, from its row of the block table, in fp32 (times
    the cache's scale)."""
    block_size = cache.shape[1]
    used = blocks[: -(-seq_len // block_size)].long()
    tokens = cache[used].flatten(0, 1)[:seq_len].float()
    return tokens if scale is None else tokens * scale


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """GQA softmax attention of one token's queries [Hq, D] over keys/values [L, Hkv, D], in fp32: [Hq, D]."""
    num_heads, head_dim = query.shape
    num_kv_heads = keys.shape[1]
    queries = query.float().view(num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.einsum("hgd,thd->hgt", queries, keys) * scale
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hgt,thd->hgd", probs, values).reshape(num_heads, head_dim)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    seq_lens: torch.Tensor, scale: float, query_start_loc: Optional[torch.Tensor] = None,
                    k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """GQA attention of each row's new tokens over its paged context, in fp32.

    q: [T, Hq, D]; row b's new tokens are q[query_start_loc[b]:query_start_loc[b + 1]] (default: one per row),
    the last n_b of its seq_lens[b]-token context, which lives in blocks
    block_table[b, :ceil(seq_lens[b] / block_size)]. Its i-th new token attends causally to the first
    seq_lens[b] - n_b + i + 1 tokens. Returns [T, Hq, D] fp32. Row by row and token by token, so that time and
    memory follow the tokens each one reads (a ragged batch is not padded to its longest row) and nothing a
    token does not see (never-written slots may hold NaN, and so may later new tokens) is ever read.
    """
    if query_start_loc is None:
        query_start_loc = torch.arange(seq_lens.shape[0] + 1, device=seq_lens.device)
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    starts = query_start_loc.tolist()
    for row, seq_len in enumerate(seq_lens.tolist()):
        first, end = starts[row], starts[row + 1]
        keys = gather_context(k_cache, block_table[row], seq_len, k_scale)        # [L, Hkv, D]
        values = gather_context(v_cache, block_table[row], seq_len, v_scale)
        for token in range(first, end):
            visible = seq_len - (end - first) + (token - first) + 1
            out[token] = attend(q[token], keys[:visible], values[:visible], scale)
    return out


def norm_rope_write_attend(q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table, seq_lens,
                           query_start_loc, positions, slot_mapping, eps, scale, k_scale, v_scale) -> torch.Tensor:
    """Both ops' math, on checked inputs with positions and slots filled in: qk RMSNorm and RoPE of every new
    token, every cache write, then paged attention (causal among a row's new tokens), in q's dtype."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    positions = positions.long()
    q_roped = apply_rope(rms_norm(q, q_norm_weight, eps), cos, sin, positions)
    k_roped = apply_rope(rms_norm(k, k_norm_weight, eps), cos, sin, positions)
    write_cache(k_cache, v_cache, k_roped, v, slot_mapping.long(), k_scale, v_scale)
    out = paged_attention(q_roped, k_cache, v_cache, block_table, seq_lens, scale, query_start_loc, k_scale, v_scale)
    return out.to(q.dtype)


def fa_fused_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor,
                   block_table: torch.Tensor, seq_lens: torch.Tensor,
                   positions: Optional[torch.Tensor] = None, slot_mapping: Optional[torch.Tensor] = None,
                   eps: float = 1e-6, scale: Optional[float] = None, k_scale: Optional[torch.Tensor] = None,
                   v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One decode step: qk-norm, RoPE, cache write, paged GQA attention, after the op's checks (the same
    C++ ``qwen::fa_fused_check`` every backend runs: it raises before anything is written)."""
    torch.ops.qwen.fa_fused_check(q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table,
                                  seq_lens, positions, slot_mapping, k_scale, v_scale)
    if positions is None:
        positions = default_positions(seq_lens)
    if slot_mapping is None:
        slot_mapping = default_slot_mapping(block_table, seq_lens, k_cache.shape[1])
    return norm_rope_write_attend(q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table,
                                  seq_lens, None, positions, slot_mapping, eps, scale, k_scale, v_scale)


def fa_fused_varlen_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor,
                          cos: torch.Tensor, sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                          positions: Optional[torch.Tensor] = None, slot_mapping: Optional[torch.Tensor] = None,
                          eps: float = 1e-6, scale: Optional[float] = None, k_scale: Optional[torch.Tensor] = None,
                          v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Several new tokens per row: qk-norm, RoPE, every token's cache write, then causal paged GQA attention,
    after the op's checks (``qwen::fa_fused_varlen_check``)."""
    torch.ops.qwen.fa_fused_varlen_check(q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache,
                                         block_table, seq_lens, query_start_loc, positions, slot_mapping, k_scale,
                                         v_scale)
    if positions is None:
        positions = context_indices(seq_lens, query_start_loc)
    if slot_mapping is None:
        slot_mapping = default_varlen_slot_mapping(block_table, seq_lens, query_start_loc, k_cache.shape[1])
    return norm_rope_write_attend(q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table,
                                  seq_lens, query_start_loc, positions, slot_mapping, eps, scale, k_scale, v_scale)


torch.library.impl("qwen::fa_fused", _REGISTRATION_KEY)(fa_fused_eager)
torch.library.impl("qwen::fa_fused_varlen", _REGISTRATION_KEY)(fa_fused_varlen_eager)
