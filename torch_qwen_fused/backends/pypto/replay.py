"""``backend="pypto"``: the pypto kernel (kernel.py) computed by pypto's graph interpreter on the CPU.

This is a validation path, not a fast one: pypto 0.2.0 has no compile cache in SIM mode, so every
call compiles the kernel (a second or more) and then interprets its tensor graph with torch ops.
What it checks is the kernel's graph semantics after pypto's compiler passes, not NPU
instructions (no AICore binary is produced without CANN). The private-API workarounds it relies
on live in compat.py.

Shared with the NPU backend (npu.py): ``prepare`` turns the op's arguments into the kernel's
(int32 indices, fp32 norm weights and cos/sin tables, defaults filled in) and ``kernel_config``
picks the compiled kernel's specialisation.
"""

import math
from typing import Optional

import torch

from . import compat
from .kernel import KernelConfig, KernelTiles, build_kernel
from ...paged import default_positions, default_slot_mapping

__all__ = ["fa_fused_pypto", "prepare", "kernel_config", "refuse_unsupported_caches"]

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_kernels: dict = {}


def kernel_config(q: torch.Tensor, k: torch.Tensor, k_cache: torch.Tensor, eps: float,
                  scale: Optional[float], tiles: Optional[KernelTiles] = None) -> KernelConfig:
    head_dim = q.shape[-1]
    return KernelConfig(
        dtype=_DTYPE_NAMES[q.dtype], cache_dtype=_DTYPE_NAMES[k_cache.dtype],
        num_heads=q.shape[1], num_kv_heads=k.shape[1], head_dim=head_dim, block_size=k_cache.shape[1],
        eps=float(eps), scale=float(scale) if scale is not None else 1.0 / math.sqrt(head_dim),
        tiles=tiles or KernelTiles())


def prepare(q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table, seq_lens,
            positions=None, slot_mapping=None) -> tuple:
    """The kernel's 14 tensor arguments (the last one, ``out``, freshly allocated). Inputs validated."""
    if positions is None:
        positions = default_positions(seq_lens)
    if slot_mapping is None:
        slot_mapping = default_slot_mapping(block_table, seq_lens, k_cache.shape[1])
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return (q.contiguous(), k.contiguous(), v.contiguous(),
            q_norm_weight.float().reshape(1, -1).contiguous(), k_norm_weight.float().reshape(1, -1).contiguous(),
            cos.float().contiguous(), sin.float().contiguous(),
            k_cache, v_cache, block_table.contiguous(), seq_lens.contiguous(),
            positions.to(torch.int32).contiguous(), slot_mapping.to(torch.int32).contiguous(), out)


def refuse_unsupported_caches(k_cache, v_cache, k_scale, v_scale, where: str) -> None:
    """The pypto kernel reads fp32/fp16/bf16 caches as they are: no fp8, no k_scale/v_scale (yet), and contiguous
    pools only (its cache tensors are dense [num_blocks * block_size, Hkv * D]; the op also takes blocks further apart
    than their size)."""
    if k_cache.dtype not in _DTYPE_NAMES or k_scale is not None or v_scale is not None:
        raise ValueError(f"fa_fused: {where} (the pypto kernel) takes float32/float16/bfloat16 caches without "
                         f"k_scale/v_scale, got a {k_cache.dtype} cache"
                         f"{' and scales' if k_scale is not None or v_scale is not None else ''}; fp8 caches run "
                         "on the CPU and eager backends")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not cache.is_contiguous():
            raise ValueError(f"fa_fused: {where} (the pypto kernel) takes contiguous caches, got {name} with strides "
                             f"{tuple(cache.stride())}; caches whose blocks lie further apart run on the CPU and "
                             "eager backends")


def _replay_kernel(config: KernelConfig):
    kernel = _kernels.get(config)
    if kernel is None:
        kernel = build_kernel(config, "sim", verify_options=compat.REPLAY_VERIFY_OPTIONS)
        _kernels[config] = kernel
    return kernel


def fa_fused_pypto(q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table, seq_lens,
                   positions=None, slot_mapping=None, eps: float = 1e-6, scale: Optional[float] = None,
                   k_scale=None, v_scale=None, tiles: Optional[KernelTiles] = None) -> torch.Tensor:
    """``qwen::fa_fused`` computed by the pypto kernel in pypto's CPU graph interpreter (slow; validation).

    Same arguments, in-place cache update and result as ``torch_qwen_fused.fa_fused``; CPU tensors
    only. Needs pypto==0.2.0, and cmake + g++ once per user to build pypto's interpreter library
    into the cache dir (see compat.py). Nothing is left in the working directory or home
    besides that cache.
    """
    args = (q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table, seq_lens,
            positions, slot_mapping)
    if q.device.type != "cpu":
        raise ValueError(f"fa_fused: backend='pypto' replays the pypto kernel on the CPU and needs CPU "
                         f"tensors, got q on {q.device}")
    torch.ops.qwen.fa_fused_check(*args, k_scale, v_scale)
    refuse_unsupported_caches(k_cache, v_cache, k_scale, v_scale, "backend='pypto'")
    if q.shape[0] == 0:
        return torch.empty_like(q)
    kernel_args = prepare(*args)
    config = kernel_config(q, k, k_cache, eps, scale, tiles)
    compat.import_pypto()
    with compat.sandbox() as tmp, compat.replay_verify_data():
        with compat.captured_output(tmp):
            _replay_kernel(config)(*kernel_args)
    # pypto wrote the caches behind autograd's back: bump their versions, as an in-place torch op does.
    torch.autograd.graph.increment_version([t for t in (k_cache, v_cache) if not t.is_inference()])
    return kernel_args[-1]
