"""A patched model under ``torch.compile``: transformers' own compiled generation (a static cache,
``CompileConfig(fullgraph=True)``, what its ``test_generate_compile_model_forward_fullgraph`` runs) must trace the
patched model's hooks and attention in one graph, compile once and give stock's tokens.

The graphs are traced by dynamo and counted, not lowered: tracing is where a graph break or a recompile shows, and it
keeps the test to seconds (inductor would spend them generating code).
"""

import pytest
import torch

pytest.importorskip("transformers")

from test_hf_patch import moe_model, prompts, qwen3_model  # noqa: E402
from torch_qwen_fused.hf import patch_model  # noqa: E402
from transformers import CompileConfig  # noqa: E402

MODELS = {"qwen3": lambda: qwen3_model((4, 2, 32, 64)), "qwen3_moe": moe_model}


class Graphs:
    """A dynamo backend that counts the graphs it is given and runs them as traced. generate() deep-copies its
    compile config; a copy counts into the same list."""

    def __init__(self):
        self.traced = []

    def __deepcopy__(self, memo):
        return self

    def __call__(self, graph_module, example_inputs):
        self.traced.append(graph_module)
        return graph_module.forward


def compiled_generate(model, backend):
    config = CompileConfig(fullgraph=True, backend=backend, mode=None)
    config._compile_all_devices = True   # transformers compiles on accelerators only, unless told
    ids, mask = prompts("padded")
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                          cache_implementation="static", compile_config=config)


@pytest.mark.parametrize("name", list(MODELS))
def test_static_cache_generation_compiles_fullgraph_once(name):
    model = MODELS[name]()
    torch._dynamo.reset()
    stock = compiled_generate(model, Graphs())
    torch._dynamo.reset()
    graphs = Graphs()
    with patch_model(model), torch._dynamo.config.patch(error_on_recompile=True):
        patched = compiled_generate(model, graphs)
    assert torch.equal(patched, stock)
    assert len(graphs.traced) == 1, "the decode steps were not one compiled graph"
