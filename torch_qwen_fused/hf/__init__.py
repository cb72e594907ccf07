"""Hugging Face Qwen3 / Qwen3-MoE with the fused decode: ``patch_model(model)`` and the paged KV cache it uses.

* ``patch.py``: ``patch_model`` and its ``PatchHandle`` (what is rebound and hooked, and how it is undone);
* ``decode.py``: when one ``fa_fused`` call serves a layer's step, and that call;
* ``rope.py``: the model's RoPE tables in fp32, as the op reads them;
* ``cache.py``: ``PagedKVCache``, the transformers ``Cache`` over paged block pools;
* ``step.py``: the plan of one forward step through it (``plan_step``); ``blocks.py``: its block table and allocator.

Importing this package imports transformers (the rest of torch_qwen_fused does not).
"""

from .blocks import BlockAllocator, BlockTable, OutOfBlocksError
from .cache import PagedKVCache, PagedLayer
from .patch import PatchHandle, patch_model

__all__ = ["patch_model", "PatchHandle", "PagedKVCache", "PagedLayer", "OutOfBlocksError", "BlockAllocator",
           "BlockTable"]
