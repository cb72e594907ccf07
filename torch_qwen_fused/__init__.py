"""torch_qwen_fused: Qwen3 decode attention as one fused PyTorch op, ``torch.ops.qwen.fa_fused``."""

import torch  # noqa: F401  (loads libtorch/libc10, which _C links against)

from . import _C  # noqa: F401  (registers the op schema and the CPU kernel)
from . import npu  # noqa: F401  (registers the PrivateUse1 kernel; imports neither torch_npu nor pypto)
from . import ops
from .ops import BACKENDS, fa_fused, rope_cos_sin

__all__ = ["fa_fused", "rope_cos_sin", "BACKENDS", "ops"]
