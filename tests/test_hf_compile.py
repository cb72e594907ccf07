"""A patched model under ``torch.compile``: transformers' own compiled generation (``CompileConfig(fullgraph=True)``,
what its ``test_generate_compile_model_forward_fullgraph`` runs) compiles the decode forward of the whole model once, in
one graph, and gives stock's tokens, with a static cache (the stock path: the patch's hooks traced) and with a
``PagedKVCache`` (the fused path: ``fa_fused`` in the graph, the step planned and committed around it); a forward
compiled by hand, wrapped by ``PatchHandle.wrap_compiled``, does the same, and so do its steps of stock attention over
the cache and of several new tokens (``fa_fused_varlen``); and each compiled decoder layer traces its
patched attention in one graph for the prefill and one for every decode step.

The graphs are traced by dynamo and counted, not lowered: tracing is where a graph break or a recompile shows, and it
keeps the test to seconds (inductor would spend them generating code).
"""

import pytest
import torch

pytest.importorskip("transformers")

from test_hf_patch import moe_model, prompts, qwen3_model  # noqa: E402
from torch_qwen_fused.hf import patch_model, pools  # noqa: E402
from torch_qwen_fused.hf.pools import grow  # noqa: E402
from transformers import CompileConfig  # noqa: E402

MODELS = {"qwen3": lambda: qwen3_model((4, 2, 32, 64)), "qwen3_moe": moe_model}
FRESH = {"qwen3": lambda: qwen3_model.__wrapped__((4, 2, 32, 64)), "qwen3_moe": moe_model.__wrapped__}


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


def compiled_generate(model, backend, new_tokens=5, **kwargs):
    config = CompileConfig(fullgraph=True, backend=backend, mode=None)
    config._compile_all_devices = True   # transformers compiles on accelerators only, unless told
    ids, mask = prompts("padded")
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          compile_config=config, **kwargs)


def stock_run_recording_growth(monkeypatch, name, new_tokens):
    """A fresh model, its padded prompts and stock's tokens, with pools.grow recorded into the returned list and
    dynamo reset: (model, ids, mask, stock, growths)."""
    model = FRESH[name]()
    ids, mask = prompts("padded")
    growths = []
    monkeypatch.setattr(pools, "grow", lambda layers, num_blocks: growths.append(grow(layers, num_blocks)))
    stock = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    torch._dynamo.reset()
    return model, ids, mask, stock, growths


@pytest.mark.parametrize("name", list(MODELS))
def test_static_cache_generation_compiles_fullgraph_once(name):
    model = MODELS[name]()
    torch._dynamo.reset()
    stock = compiled_generate(model, Graphs(), cache_implementation="static")
    torch._dynamo.reset()
    graphs = Graphs()
    with patch_model(model), torch._dynamo.config.patch(error_on_recompile=True):
        patched = compiled_generate(model, graphs, cache_implementation="static")
    assert torch.equal(patched, stock)
    assert len(graphs.traced) == 1, "the decode steps were not one compiled graph"


@pytest.mark.parametrize("growable", [False, True], ids=["sized", "growing"])
@pytest.mark.parametrize("name", list(MODELS))
def test_fused_generation_compiles_fullgraph_once(monkeypatch, name, growable):
    # generate() compiles the whole decode forward when a compile_config asks, a PagedKVCache's too: its step is
    # planned before the compiled call and committed after it (the planning reads values into Python, which fullgraph
    # forbids). block_size 4: the block table widens every 4 steps; a growing cache's pools are reallocated larger
    # during the decode steps; the mask and the seen positions take a column each step. None may recompile.
    new_tokens = 12
    model, ids, mask, stock, growths = stock_run_recording_growth(monkeypatch, name, new_tokens)
    graphs = Graphs()
    with patch_model(model, block_size=4) as handle, torch._dynamo.config.patch(error_on_recompile=True):
        patched = compiled_generate(model, graphs, new_tokens, cache=handle.new_cache() if growable else None)
    assert torch.equal(patched, stock)
    assert handle.fused_calls == len(model.model.layers) * (new_tokens - 1)
    assert bool(growths) == growable
    assert len(graphs.traced) == 1, "the decode steps were not one compiled graph"
    assert str(graphs.traced[0].graph).count("fa_fused") == len(model.model.layers)


@pytest.mark.parametrize("grad", [False, True], ids=["fa_fused", "stock_attention"])
def test_wrapped_compiled_forward_decodes_fullgraph_once(grad):
    # A decode loop of one's own: torch.compile(model, fullgraph=True), wrapped by the handle, with a PagedKVCache.
    # With gradients on the ops are not used (inference-only): the stock attention reads the cache, in one graph too.
    model = FRESH["qwen3"]()
    ids, mask = prompts("padded")
    new_tokens = 6
    stock = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    torch._dynamo.reset()
    graphs = Graphs()
    with (patch_model(model, block_size=4) as handle, torch._dynamo.config.patch(error_on_recompile=True),
          torch.set_grad_enabled(grad)):
        step = handle.wrap_compiled(torch.compile(model, fullgraph=True, backend=graphs))
        cache = handle.new_cache()
        tokens, positions = ids, (mask.cumsum(-1) - 1).clamp(min=0)
        for _ in range(new_tokens):
            forward = model if tokens is ids else step      # the prefill eagerly, as generate() does
            logits = forward(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache).logits
            tokens = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat((ids, tokens), dim=1)
            mask = torch.cat((mask, mask.new_ones(mask.shape[0], 1)), dim=1)
            positions = positions[:, -1:] + 1
    assert torch.equal(ids, stock)
    assert handle.fused_calls == (0 if grad else len(model.model.layers) * (new_tokens - 1))
    assert len(graphs.traced) == 1 and ("fa_fused" in str(graphs.traced[0].graph)) != grad


def test_wrapped_compiled_forward_of_several_tokens_compiles_once():
    # Steps of 2 new tokens over the cache (a chunked prefill, assisted decoding's verification): fa_fused_varlen in
    # one graph for all of them, the same logits as the eager patched model.
    model = FRESH["qwen3"]()
    ids, mask = prompts("padded")
    new = torch.randint(1, model.config.vocab_size, (ids.shape[0], 6), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    graphs = Graphs()
    runs = []
    with (patch_model(model, block_size=4) as handle, torch._dynamo.config.patch(error_on_recompile=True),
          torch.no_grad()):
        step = handle.wrap_compiled(torch.compile(model, fullgraph=True, backend=graphs))
        for forward in (model, step):
            cache, seen, positions = handle.new_cache(), mask, (mask.cumsum(-1) - 1).clamp(min=0)
            model(input_ids=ids, attention_mask=seen, position_ids=positions, cache=cache)
            logits = []
            for start in range(0, new.shape[1], 2):
                seen = torch.cat((seen, seen.new_ones(seen.shape[0], 2)), dim=1)
                positions = positions[:, -1:] + torch.arange(1, 3)
                logits.append(forward(input_ids=new[:, start:start + 2], attention_mask=seen, position_ids=positions,
                                      cache=cache).logits)
            runs.append(torch.stack(logits))
    assert torch.equal(runs[1], runs[0])
    assert handle.varlen_calls == 2 * len(model.model.layers) * new.shape[1] // 2
    assert len(graphs.traced) == 1 and "fa_fused_varlen" in str(graphs.traced[0].graph)


@pytest.mark.parametrize("growable", [False, True], ids=["sized", "growing"])
@pytest.mark.parametrize("name", list(MODELS))
def test_fused_decode_layers_compile_fullgraph_once(monkeypatch, name, growable):
    # block_size 4: every row takes a new block each 4 steps (the block table widens); a growing cache's pools are
    # reallocated larger during the decode steps. Neither may recompile a layer.
    # A model of its own: one that ever returned attention weights carries transformers' output-capturing hooks on its
    # attention modules, which read a ContextVar (no graph through a single layer then, stock or patched).
    new_tokens = 12
    model, ids, mask, stock, growths = stock_run_recording_growth(monkeypatch, name, new_tokens)
    graphs = Graphs()
    layers = model.model.layers
    with patch_model(model, block_size=4) as handle:
        cache = handle.new_cache() if growable else None
        try:
            for layer in layers:
                layer.compile(fullgraph=True, backend=graphs)
            patched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                     cache=cache)
        finally:
            for layer in layers:
                layer._compiled_call_impl = None
    assert torch.equal(patched, stock)
    assert handle.fused_calls == len(layers) * (new_tokens - 1)
    assert bool(growths) == growable
    # Per layer: one graph for the prefill (stock attention writing the paged cache), one for all the decode steps.
    assert len(graphs.traced) == 2 * len(layers), "a decode step recompiled a layer"
    assert all("fa_fused" in str(graph.graph) for graph in graphs.traced[len(layers):])
