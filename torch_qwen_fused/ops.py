"""The public entry points ``fa_fused`` and ``fa_fused_varlen`` and their backend switch."""

import os
from typing import Optional

import torch

from .backends.eager import fa_fused_eager, fa_fused_varlen_eager

__all__ = ["fa_fused", "fa_fused_varlen", "reload_cpu_switches", "cpu_attention_path", "BACKENDS"]

BACKENDS = ("cpu", "eager", "pypto")
BACKEND_ENV = "TORCH_QWEN_FUSED_BACKEND"


def fa_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor,
             cos: torch.Tensor, sin: torch.Tensor,
             k_cache: torch.Tensor, v_cache: torch.Tensor,
             block_table: torch.Tensor, seq_lens: torch.Tensor,
             positions: Optional[torch.Tensor] = None, slot_mapping: Optional[torch.Tensor] = None,
             eps: float = 1e-6, scale: Optional[float] = None, k_scale: Optional[torch.Tensor] = None,
             v_scale: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """One Qwen3 decode step of attention for a batch of sequences, each with one new token.

    For each row b, with positions[b] (default seq_lens[b] - 1) as the new token's RoPE position:
    q and k go through per-head RMSNorm (``q_norm_weight``, ``k_norm_weight``) and rotate-half RoPE
    (``cos``, ``sin``), all in fp32. The roped k and the raw v are rounded once to the cache dtype and
    written **in place** into ``k_cache``/``v_cache`` at the new token's slot (slot_mapping[b], default
    the slot of token seq_lens[b] - 1 through ``block_table``), *before* attention reads the cache.
    Then q attends to the row's first seq_lens[b] tokens (the new one included) with fp32 online
    softmax, scaled by ``scale`` (default 1/sqrt(head_dim)).

    GQA: the kv heads are shared by groups of query heads. With num_heads = 40 and num_kv_heads = 8,
    query heads 0-4 attend to kv head 0, heads 5-9 to kv head 1, and so on
    (head h uses kv head h // (num_heads // num_kv_heads)).

    Arguments:
        q: (batch_size, num_heads, head_dim), float32/float16/bfloat16. After the q projection,
            before norm and RoPE. head_dim is a multiple of 16, at most 256.
        k: (batch_size, num_kv_heads, head_dim), q's dtype. After the k projection, before norm and
            RoPE. num_heads must be a multiple of num_kv_heads.
        v: (batch_size, num_kv_heads, head_dim), q's dtype. Written to the cache as is.
        q_norm_weight, k_norm_weight: (head_dim,), any float dtype. Qwen3's q_norm / k_norm weights.
        cos, sin: (max_position, head_dim), any float dtype. Rotate-half tables
            (``cat(freqs, freqs)``); see ``rope_cos_sin``.
        k_cache, v_cache: (num_blocks, block_size, num_kv_heads, head_dim), contiguous,
            float32/float16/bfloat16/float8_e4m3fn/float8_e5m2 (may differ from q's). Paged cache of one
            layer, vLLM's "NHD" layout, any block_size >= 1. Updated in place at the new token's slot.
        block_table: (batch_size, max_blocks), int32. Physical block of each logical block of each
            row; only the first ceil(seq_lens[b] / block_size) entries of row b are read.
        seq_lens: (batch_size,), int32. Context length of each row **including** the new token, >= 1;
            rows may differ.
        positions [optional]: (batch_size,), int64. RoPE position of the new token. Default
            seq_lens - 1; differs from the cache position under left padding.
        slot_mapping [optional]: (batch_size,), int64. Flat cache slot
            ``block * block_size + offset`` for the new token; -1 skips the write of that row (its
            output is then unspecified). Default: derived from block_table and seq_lens.
        eps: float. RMSNorm epsilon. Default 1e-6.
        scale [optional]: float. Softmax scale. Default 1 / sqrt(head_dim).
        k_scale, v_scale [optional]: (1,) float32 tensors, finite and > 0 (vLLM's per-layer scales; None: 1).
            The caches store ``saturate(x / scale)`` rounded to nearest even in their dtype (fp8 saturates to
            its finite range) and are read as ``stored * scale``. Tensors, so that new values never
            recompile a compiled graph.
        backend [optional]: None dispatches by device (the C++ kernel on the CPU, the eager fallback
            on devices without a kernel, the pypto kernel on an Ascend NPU), unless the environment
            variable TORCH_QWEN_FUSED_BACKEND names one; "cpu": the C++ kernel; "eager": the
            pure-PyTorch fallback; "pypto": the pypto kernel replayed on the CPU by pypto's graph
            interpreter (slow; for validation).

    Return:
        out: (batch_size, num_heads, head_dim), q's dtype.

    Raises:
        ValueError naming the argument, before anything is written, for any shape, dtype, device,
        layout or index (seq_lens, block ids, positions, slots) outside the contract, and for writes
        whose result would depend on the kernel's order (caches sharing memory, an input overlapping a
        cache, two rows writing one slot) or that torch forbids (inference-tensor caches outside
        ``torch.inference_mode()``). RuntimeError if, with grad mode on, an input requires grad: the op
        is inference-only (its cache writes do bump the caches' version counters).
    """
    def pypto(*args, **kwargs):
        from .backends.pypto.replay import fa_fused_pypto

        return fa_fused_pypto(*args, **kwargs)

    args = (q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table, seq_lens,
            positions, slot_mapping)
    kernels = {"cpu": torch.ops.qwen.fa_fused, "eager": fa_fused_eager, "pypto": pypto}
    return _run("fa_fused", kernels, backend, args, dict(eps=eps, scale=scale, k_scale=k_scale, v_scale=v_scale))


def fa_fused_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                    positions: Optional[torch.Tensor] = None, slot_mapping: Optional[torch.Tensor] = None,
                    eps: float = 1e-6, scale: Optional[float] = None, k_scale: Optional[torch.Tensor] = None,
             v_scale: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Qwen3 attention for several new tokens per row (speculative decoding's verification, chunked prefill).

    The tokens of all rows are packed along the first dim, as in flash-attn's ``varlen`` functions: row b's
    n_b = query_start_loc[b + 1] - query_start_loc[b] new tokens are q[query_start_loc[b]:query_start_loc[b + 1]]
    and are the *last* n_b of its seq_lens[b]-token context (seq_lens counts them). Every token goes through
    ``fa_fused``'s steps: per-head RMSNorm of q and k, rotate-half RoPE at positions[t] (default its context
    index c = seq_lens[b] - n_b + i for row b's i-th new token), and the write of its roped k and raw v **in
    place** into k_cache/v_cache at slot_mapping[t] (default: context index c through block_table). All writes
    happen before any read. Then new token i attends causally to context indices 0..c: the earlier tokens of
    the row and the new tokens up to itself. Each K/V row of the context is read once for all of a row's new
    tokens and the heads of its GQA group, so verifying 4 draft tokens costs about one decode step.

    With query_start_loc = arange(B + 1) (one token per row) it is exactly ``fa_fused``; rows with no new
    token (n_b = 0) are allowed and produce nothing.

    Arguments:
        q: (total_tokens, num_heads, head_dim), float32/float16/bfloat16, total_tokens = query_start_loc[-1].
        k, v: (total_tokens, num_kv_heads, head_dim), q's dtype.
        q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache: as in ``fa_fused``.
        block_table: (batch_size, max_blocks), int32; seq_lens: (batch_size,), int32, each >= n_b and >= 1.
        query_start_loc: (batch_size + 1,), int32: 0, then the running total of each row's new tokens
            (non-decreasing).
        positions [optional]: (total_tokens,), int64 (or int32). RoPE position of each new token.
        slot_mapping [optional]: (total_tokens,), int64 (or int32). Flat cache slot of each new token; -1 skips
            its write (padding tokens; their outputs are then unspecified). No two tokens may share a slot.
        eps, scale, backend: as in ``fa_fused`` (the pypto kernel serves ``fa_fused`` only).

    Return:
        out: (total_tokens, num_heads, head_dim), q's dtype.

    Raises:
        ValueError naming the argument, before anything is written, for everything ``fa_fused`` refuses and
        a query_start_loc that does not start at 0, decreases, gives a row more new tokens than its seq_len, or
        does not end at total_tokens. RuntimeError if, with grad mode on, an input requires grad.
    """
    def pypto(*args, **kwargs):
        raise ValueError("fa_fused_varlen: the pypto kernel takes one new token per row (fa_fused); use backend "
                         "None, 'cpu' or 'eager'")

    args = (q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table, seq_lens,
            query_start_loc, positions, slot_mapping)
    kernels = {"cpu": torch.ops.qwen.fa_fused_varlen, "eager": fa_fused_varlen_eager, "pypto": pypto}
    return _run("fa_fused_varlen", kernels, backend, args,
                dict(eps=eps, scale=scale, k_scale=k_scale, v_scale=v_scale))


def _run(name: str, kernels: dict, backend: Optional[str], args: tuple, kwargs: dict) -> torch.Tensor:
    """``backend`` (or TORCH_QWEN_FUSED_BACKEND; None: the op through the dispatcher) on ``args``."""
    backend = backend or os.environ.get(BACKEND_ENV) or None
    if backend is None:
        return kernels["cpu"](*args, **kwargs)
    if backend not in kernels:
        raise ValueError(f"{name}: backend must be None or one of {BACKENDS}, got {backend!r}")
    if backend == "cpu" and args[0].device.type != "cpu":
        raise ValueError(f"{name}: backend='cpu' needs CPU tensors, got q on {args[0].device}")
    return kernels[backend](*args, **kwargs)


def reload_cpu_switches() -> None:
    """Makes the CPU kernel read ``TORCH_QWEN_FUSED_CPU_ISA`` and ``TORCH_QWEN_FUSED_KV_CHUNK`` again at its
    next call (it reads them, and the CPU's features, once per process)."""
    torch.ops.qwen.reload_cpu_switches()


def cpu_attention_path(cache_dtype: torch.dtype) -> str:
    """The CPU kernel a call over a ``cache_dtype`` cache takes on this machine (under the current switches) and how
    it computes, e.g. ``"avx2: fp32 FMA, 8 lanes"``: the widest kernel the CPU runs that reads that dtype."""
    return torch.ops.qwen.cpu_attention_path(cache_dtype)
