"""The Ascend NPU kernel of ``qwen::fa_fused``: the pypto kernel (pypto/kernel.py), registered for PrivateUse1.

torch_npu runs Ascend devices as torch's ``PrivateUse1`` backend, so registering for that dispatch
key needs neither torch_npu nor pypto at import time: importing this module only adds the
registration. The first call on an NPU tensor imports pypto (which then loads CANN), compiles the
kernel once per model config (batch, context length and cache size are dynamic axes, so no
recompiles as they change) and launches it on the current NPU stream (pypto's
``LaunchKernelTorch`` on ``torch.npu.current_stream()``).

Needs, on the NPU machine: CANN (``ASCEND_HOME_PATH`` set), ``torch_npu`` and ``pypto==0.2.0``
(``pip install 'torch_qwen_fused[npu]'``).
"""

from typing import Optional

import torch

__all__ = ["fa_fused_npu", "DISPATCH_KEY"]

DISPATCH_KEY = "PrivateUse1"
_kernels: dict = {}


def _npu_kernel(config):
    kernel = _kernels.get(config)
    if kernel is None:
        from .pypto.kernel import build_kernel

        kernel = build_kernel(config, "npu")
        _kernels[config] = kernel
    return kernel


def fa_fused_npu(q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table, seq_lens,
                 positions: Optional[torch.Tensor] = None, slot_mapping: Optional[torch.Tensor] = None,
                 eps: float = 1e-6, scale: Optional[float] = None, k_scale: Optional[torch.Tensor] = None,
                 v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``qwen::fa_fused`` on an Ascend NPU: validate, then launch the pypto kernel on the current stream."""
    args = (q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table, seq_lens,
            positions, slot_mapping)
    torch.ops.qwen.fa_fused_check(*args, k_scale, v_scale)
    from .pypto.replay import kernel_config, prepare, refuse_unsupported_caches

    refuse_unsupported_caches(k_cache, v_cache, k_scale, v_scale, "the NPU kernel")
    if q.shape[0] == 0:
        return torch.empty_like(q)
    from .pypto import compat

    compat.import_pypto()
    kernel_args = prepare(*args)
    with compat.process_dirs(), compat.restored_root_logger():
        _npu_kernel(kernel_config(q, k, k_cache, eps, scale))(*kernel_args)
    return kernel_args[-1]


# (torch.library.impl used as a decorator returns None: register, and keep the name for callers and tests.)
torch.library.impl("qwen::fa_fused", DISPATCH_KEY)(fa_fused_npu)
