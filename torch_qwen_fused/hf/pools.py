"""The block pools of a ``PagedKVCache``: per layer ``k_cache`` / ``v_cache`` ``[num_blocks, block_size, Hkv, D]``,
allocated, grown and copied for all layers at once, and what is stored there and read back.

fp8 pools store ``saturate(x / scale)`` (the contract's section 7, ``fa_fused``'s ``k_scale`` / ``v_scale``) with
one scale per layer and K/V, calibrated from the layer's first write unless given; reads dequantize.
"""

from typing import Optional, Sequence

import torch

from ..backends.eager import quantize

__all__ = ["FP8_DTYPES", "allocate", "grow", "copy_blocks", "write", "gather"]

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The same memory as uint8 for fp8 tensors (torch's index_copy_ has no fp8 kernel), else ``t``."""
    return t.view(torch.uint8) if t.dtype in FP8_DTYPES else t


def _calibrated_scale(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[1] fp32: the scale that maps x's absolute maximum onto the fp8 dtype's largest finite value."""
    absmax = x.detach().abs().max().float().clamp(min=torch.finfo(torch.float32).tiny)
    return (absmax / torch.finfo(dtype).max).reshape(1)


def allocate(layers: Sequence, shape: tuple, dtype: torch.dtype, device) -> None:
    """Fresh pools of ``shape`` for every layer (their given scales moved to ``device``)."""
    for layer in layers:
        # Zeros, not empty: attention may read (masked) slots that were never written, and 0 * NaN is NaN.
        layer.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        layer.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        _grows(layer)
        layer.k_scale = None if layer.k_scale is None else layer.k_scale.to(device)
        layer.v_scale = None if layer.v_scale is None else layer.v_scale.to(device)
        layer.is_initialized = True


def grow(layers: Sequence, num_blocks: int) -> None:
    """Every layer's pools reallocated with ``num_blocks`` blocks, the old blocks copied first."""
    for layer in layers:
        for name in ("k_cache", "v_cache"):
            old = getattr(layer, name)
            grown = old.new_zeros((num_blocks,) + tuple(old.shape[1:]))
            grown[: old.shape[0]] = old
            setattr(layer, name, grown)
        _grows(layer)


def _grows(layer) -> None:
    """A growable pool's block count is dynamic to torch.compile: a compiled layer is not recompiled when it grows."""
    for pool in (layer.k_cache, layer.v_cache):
        torch._dynamo.maybe_mark_dynamic(pool, 0)


def copy_blocks(layers: Sequence, sources: Sequence[int], targets: Sequence[int]) -> None:
    """Block ``targets[i]`` of every pool becomes a copy of block ``sources[i]``."""
    device = layers[0].k_cache.device
    src = torch.tensor(sources, dtype=torch.long, device=device)
    dst = torch.tensor(targets, dtype=torch.long, device=device)
    for layer in layers:
        for pool in (_as_bytes(layer.k_cache), _as_bytes(layer.v_cache)):
            pool.index_copy_(0, dst, pool.index_select(0, src))


def write(layer, key_states: torch.Tensor, value_states: torch.Tensor, slots: torch.Tensor,
          real_index: Optional[torch.Tensor]) -> tuple:
    """Stores the real tokens of ``key_states`` / ``value_states`` ([B, Hkv, q, D]; ``real_index``: their flat
    b * q + t indices, None if all) at the flat ``slots``, in the pools' dtype (an fp8 pool calibrates its scale
    from this first write if it has none). Returns the states as attention must read them: the inputs, or for an
    fp8 pool what it stores, dequantized (as the fused ops read the new tokens)."""
    batch, heads, length, head_dim = key_states.shape
    read = []
    for new, pool, scale_name in ((key_states, layer.k_cache, "k_scale"), (value_states, layer.v_cache, "v_scale")):
        def real_tokens(states):
            flat = states.transpose(1, 2).reshape(batch * length, heads, head_dim)
            return flat if real_index is None else flat.index_select(0, real_index)

        if pool.dtype in FP8_DTYPES and getattr(layer, scale_name) is None:
            setattr(layer, scale_name, _calibrated_scale(real_tokens(new), pool.dtype))
        scale = getattr(layer, scale_name)
        stored = quantize(new, pool.dtype, scale)
        _as_bytes(pool).view(-1, heads, head_dim).index_copy_(0, slots, _as_bytes(real_tokens(stored.detach())))
        read.append(new if pool.dtype not in FP8_DTYPES else (stored.float() * scale).to(new.dtype))
    return tuple(read)


def gather(pool: torch.Tensor, slots: torch.Tensor, stored: torch.Tensor, scale: Optional[torch.Tensor],
           dtype: torch.dtype) -> torch.Tensor:
    """[B, Hkv, seen, D]: ``pool`` at the flat ``slots`` [B, seen], zeros where ``stored`` is False, in ``dtype``
    (an fp8 pool dequantized, times its scale)."""
    batch, seen = slots.shape
    heads, head_dim = pool.shape[2:]
    flat = pool.view(-1, heads, head_dim).index_select(0, slots.reshape(-1))
    flat = (flat.float() * scale).to(dtype) if pool.dtype in FP8_DTYPES else flat.to(dtype)
    return flat.view(batch, seen, heads, head_dim).masked_fill_(~stored[..., None, None], 0).transpose(1, 2)
