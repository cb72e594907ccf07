"""torch_qwen_fused: Qwen3 decode attention as one fused PyTorch op, ``torch.ops.qwen.fa_fused``.

Importing the package registers the op and its kernels: the schema, argument checks and CPU kernel (C++,
``_C``), the eager kernel for every other device (``backends.eager``), the Ascend NPU kernel
(``backends.npu``; imports neither torch_npu nor pypto) and the fake kernels, which are also the Meta kernels
(``fake``).
"""

import torch  # noqa: F401  (loads libtorch/libc10, which _C links against)

from . import _C  # noqa: F401
from .backends import eager, npu  # noqa: F401
from . import fake  # noqa: F401
from . import ops
from .ops import BACKENDS, cpu_attention_path, fa_fused, fa_fused_varlen, reload_cpu_switches
from .rope import rope_cos_sin

__all__ = ["fa_fused", "fa_fused_varlen", "rope_cos_sin", "reload_cpu_switches", "cpu_attention_path", "BACKENDS",
           "ops"]
