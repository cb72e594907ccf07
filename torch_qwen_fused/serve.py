"""``transformers serve`` with the fused attention: ``python -m torch_qwen_fused.serve MODEL [options]``.

Runs Hugging Face's OpenAI-compatible server (``transformers serve``, the same options; ``pip install
'transformers[serving]'``) with every Qwen3 / Qwen3-MoE model it loads patched by ``torch_qwen_fused.hf.patch_model``:
with ``--continuous-batching`` each step of each layer is one ``fa_fused`` / ``fa_fused_varlen`` call on HF's own
pages, without it ``generate()`` decodes through a ``PagedKVCache``. Other models are served stock.

    python -m torch_qwen_fused.serve Qwen/Qwen3-0.6B --continuous-batching --device cpu --port 8000
"""

import sys
from typing import Optional, Sequence

__all__ = ["main", "patch_loaded_models", "PATCHED"]

# The handles of the models this process's server loaded and patched (``handle.fused_calls`` counts their calls).
PATCHED = []


def patch_loaded_models() -> None:
    """Makes transformers' serving model manager patch each Qwen3 model it loads, before the first request."""
    from transformers.cli.serving.model_manager import ModelManager

    from .hf import patch_model

    load = ModelManager._load_model
    if getattr(load, "_torch_qwen_fused", False):
        return

    def load_and_patch(self, *args, **kwargs):
        model = load(self, *args, **kwargs)
        try:
            PATCHED.append(patch_model(model))
        except TypeError:   # not a Qwen3 model: served stock
            pass
        return model

    load_and_patch._torch_qwen_fused = True
    ModelManager._load_model = load_and_patch


def main(argv: Optional[Sequence[str]] = None):
    """``transformers serve`` with ``argv`` (default: the command line), Qwen3 models patched. Returns what the
    command returns (the ``Serve`` object, which only outlives the call with transformers' ``--non-blocking``)."""
    from transformers.cli.transformers import app

    patch_loaded_models()
    args = list(sys.argv[1:] if argv is None else argv)
    return app(["serve", *args], prog_name="python -m torch_qwen_fused.serve", standalone_mode=False)


if __name__ == "__main__":
    main()
