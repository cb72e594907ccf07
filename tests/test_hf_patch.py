"""Stock Hugging Face Qwen3 vs the same model patched by ``torch_qwen_fused.hf.patch_model``.

Tiny random configs built here (no hub downloads), all on the CPU: the stock model (attn_implementation="sdpa")
and the patched one share their weights, and must give the same tokens and (fp32) logits within 1e-4 at every
step, with every decode step of every layer going through ``torch.ops.qwen.fa_fused``. The second half covers
the other paths HF users take (assisted decoding, attention outputs, deep copies, casts, gradients, cache
reuse, freed rows), each against stock on the same inputs, cache contents included.
"""

import copy
import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers")

import torch_qwen_fused  # noqa: E402,F401
from torch_qwen_fused.hf import OutOfBlocksError, PagedKVCache, patch_model  # noqa: E402
from transformers import (  # noqa: E402
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention  # noqa: E402

VOCAB = 512
LAYERS = 2
NEW_TOKENS = 10
# (num_heads, num_kv_heads, head_dim, hidden_size): GQA 2, odd GQA 3, the Qwen3-14B attention on a small hidden size
HEAD_LAYOUTS = [(4, 2, 32, 64), (9, 3, 16, 48), (40, 8, 128, 64)]
# Real prompt lengths. The batch is left-padded; with NEW_TOKENS new tokens the longer rows cross the
# 128-token block boundary at different steps (and every 4-token one).
PROMPTS = {"single": [123], "padded": [125, 121, 99]}
BLOCK_SIZES = [4, 128]
FP32_TOL = 1e-4


class CountFusedCalls(TorchDispatchMode):
    """Counts the calls that really reached the ``qwen::fa_fused`` and ``qwen::fa_fused_varlen`` operators."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.varlen_calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.qwen.fa_fused.default:
            self.calls += 1
        if func is torch.ops.qwen.fa_fused_varlen.default:
            self.varlen_calls += 1
        return func(*args, **(kwargs or {}))


def qwen3_config(layout, attn_implementation="sdpa", **extra):
    num_heads, num_kv_heads, head_dim, hidden = layout
    return dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=LAYERS,
                num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
                max_position_embeddings=1024, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                initializer_range=0.2, attn_implementation=attn_implementation, **extra)


def finish(model, dtype):
    """Random norm weights (ones would hide a mix-up of q_norm and k_norm), no EOS: fixed-length runs."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.to(dtype).eval()


@functools.lru_cache(maxsize=None)
def qwen3_model(layout, dtype=torch.float32, attn_implementation="sdpa"):
    torch.manual_seed(0)
    return finish(Qwen3ForCausalLM(Qwen3Config(**qwen3_config(layout, attn_implementation))), dtype)


@functools.lru_cache(maxsize=None)
def moe_model():
    torch.manual_seed(0)
    config = Qwen3MoeConfig(**qwen3_config((8, 4, 32, 64)), num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=64, decoder_sparse_step=1, norm_topk_prob=True)
    return finish(Qwen3MoeForCausalLM(config), torch.float32)


def prompts(kind):
    """Left-padded input_ids and attention_mask with the real lengths of PROMPTS[kind]."""
    lengths = PROMPTS[kind]
    width = max(lengths)
    generator = torch.Generator().manual_seed(len(lengths))
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=generator)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, width - length:] = 1
    return ids.masked_fill(mask == 0, 0), mask


def generate(model, kind, new_tokens=NEW_TOKENS, **kwargs):
    ids, mask = prompts(kind)
    kwargs.setdefault("do_sample", False)
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                          return_dict_in_generate=True, output_logits=True, **kwargs)


@functools.lru_cache(maxsize=None)
def stock_run(layout, kind):
    return generate(qwen3_model(layout), kind)


def max_logit_diff(a, b):
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a.logits, b.logits))


def assert_cache_matches_stock(paged, dynamic):
    """HF's view of the paged cache (layers[i].keys/.values, [B, Hkv, seen, D]) is the DynamicCache's at
    every stored position, and zero where padding was never stored."""
    assert paged.get_seq_length() == dynamic.get_seq_length()
    stored = paged.stored_positions[:, None, :, None]
    for ours, theirs in zip(paged.layers, dynamic.layers, strict=True):
        for mine, stock in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
            assert mine.shape == stock.shape
            torch.testing.assert_close(mine, stock * stored, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(PROMPTS))
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("layout", HEAD_LAYOUTS, ids=lambda layout: "x".join(map(str, layout)))
def test_greedy_matches_stock(layout, block_size, kind):
    model = qwen3_model(layout)
    stock = stock_run(layout, kind)
    assert isinstance(stock.cache, DynamicCache)
    with patch_model(model, block_size=block_size) as handle, CountFusedCalls() as counter:
        fused = generate(model, kind)
    assert isinstance(fused.cache, PagedKVCache)
    assert torch.equal(fused.sequences, stock.sequences)
    assert max_logit_diff(fused, stock) <= FP32_TOL
    decode_steps = NEW_TOKENS - 1  # the first new token comes from the prefill
    assert handle.fused_calls == decode_steps * LAYERS == counter.calls
    # Only real tokens are cached: the prompt without padding, then the decoded ones.
    expected = [length + decode_steps for length in PROMPTS[kind]]
    assert fused.cache.seq_lens.tolist() == expected
    assert fused.cache.get_seq_length() == stock.cache.get_seq_length()
    assert fused.cache.block_size == block_size
    assert sum(map(len, fused.cache.row_blocks)) == sum(-(-n // block_size) for n in expected)


def test_cache_holds_roped_real_tokens_only():
    """Row by row, the paged cache holds exactly stock's cached K/V at the non-padding positions."""
    layout = HEAD_LAYOUTS[0]
    model = qwen3_model(layout)
    stock = stock_run(layout, "padded")
    with patch_model(model, block_size=4):
        fused = generate(model, "padded")
    _, mask = prompts("padded")
    real = torch.cat((mask, torch.ones(mask.shape[0], NEW_TOKENS - 1, dtype=mask.dtype)), dim=1).bool()
    cache = fused.cache
    for layer_idx in range(LAYERS):
        layer = cache.layers[layer_idx]
        for row, blocks in enumerate(cache.row_blocks):
            length = int(cache.seq_lens[row])
            keys = layer.k_cache[blocks].flatten(0, 1)[:length]       # [T, Hkv, D]
            values = layer.v_cache[blocks].flatten(0, 1)[:length]
            stock_keys = stock.cache.layers[layer_idx].keys[row][:, real[row]].transpose(0, 1)
            stock_values = stock.cache.layers[layer_idx].values[row][:, real[row]].transpose(0, 1)
            torch.testing.assert_close(keys, stock_keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(values, stock_values, atol=1e-5, rtol=1e-5)
    assert torch.equal(cache.stored_positions, real)
    assert_cache_matches_stock(cache, stock.cache)


def test_sampling_matches_stock():
    layout = HEAD_LAYOUTS[0]
    model = qwen3_model(layout)
    sampling = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.95)
    torch.manual_seed(1234)
    stock = generate(model, "padded", **sampling)
    with patch_model(model, block_size=4) as handle:
        torch.manual_seed(1234)
        fused = generate(model, "padded", **sampling)
    assert torch.equal(fused.sequences, stock.sequences)
    assert max_logit_diff(fused, stock) <= FP32_TOL
    assert handle.fused_calls == (NEW_TOKENS - 1) * LAYERS


def test_bf16_logits_close_to_stock():
    """bf16 model: stock rounds q/k to bf16 after norm and RoPE; fa_fused keeps fp32 inside. Same tokens are
    forced on both runs, so the logits compare step by step."""
    layout = HEAD_LAYOUTS[2]
    model = qwen3_model(layout, torch.bfloat16)
    stock = generate(model, "padded")
    width = prompts("padded")[0].shape[1]
    forced = stock.sequences[:, width:].tolist()

    def force(row, sequence):
        return [forced[row][sequence.shape[0] - width]]

    # model.to(bfloat16) rounded the rotary inv_freq too: patch_model says so, and follows the model.
    with pytest.warns(UserWarning, match="rotary embedding differs"):
        handle = patch_model(model, block_size=4)
    with handle:
        fused = generate(model, "padded", prefix_allowed_tokens_fn=force)
    assert torch.equal(fused.sequences, stock.sequences)
    assert handle.fused_calls == (NEW_TOKENS - 1) * LAYERS
    diff = max_logit_diff(fused, stock)
    scale = max(x.float().abs().max().item() for x in stock.logits)
    print(f"bf16 max |logit diff| vs stock: {diff:.4g} (max |logit| {scale:.3g})")
    assert diff <= 0.05 * scale


def test_remove_restores_stock_exactly():
    layout = HEAD_LAYOUTS[0]
    model = qwen3_model(layout)
    attentions = [layer.self_attn for layer in model.model.layers]
    hooks = (dict(model.model._forward_pre_hooks), dict(model.model._forward_hooks))
    handle = patch_model(model, block_size=4)
    assert all("forward" in attn.__dict__ for attn in attentions)
    generate(model, "single", new_tokens=3)
    calls = handle.fused_calls
    assert calls == 2 * LAYERS
    handle.remove()
    handle.remove()  # idempotent
    assert not handle.active
    assert all("forward" not in attn.__dict__ for attn in attentions)
    assert all(attn.forward.__func__ is Qwen3Attention.forward for attn in attentions)
    assert "_prepare_cache_for_generation" not in model.__dict__
    assert (dict(model.model._forward_pre_hooks), dict(model.model._forward_hooks)) == hooks
    after = generate(model, "padded")
    stock = stock_run(layout, "padded")
    assert handle.fused_calls == calls
    assert isinstance(after.cache, DynamicCache)
    assert torch.equal(after.sequences, stock.sequences)
    assert all(torch.equal(a, b) for a, b in zip(after.logits, stock.logits))


def test_patch_twice_is_harmless():
    model = qwen3_model(HEAD_LAYOUTS[0])
    with patch_model(model, block_size=4) as first:
        second = patch_model(model, block_size=8)
        assert second is first and first.block_size == 8
        fused = generate(model, "single", new_tokens=4)
        assert first.fused_calls == 3 * LAYERS
        assert fused.cache.block_size == 8
    assert all("forward" not in layer.self_attn.__dict__ for layer in model.model.layers)


def test_patches_this_model_only():
    layout = HEAD_LAYOUTS[0]
    config = Qwen3Config(**qwen3_config(layout))
    torch.manual_seed(0)
    patched = finish(Qwen3ForCausalLM(config), torch.float32)
    torch.manual_seed(0)
    other = finish(Qwen3ForCausalLM(config), torch.float32)
    class_forward = Qwen3Attention.forward
    with patch_model(patched, block_size=4) as handle:
        for layer in patched.model.layers:
            assert layer.self_attn.forward._torch_qwen_fused_patch is handle
        for layer in other.model.layers:
            assert "forward" not in layer.self_attn.__dict__
            assert layer.self_attn.forward.__func__ is class_forward
        assert Qwen3Attention.forward is class_forward
        assert isinstance(generate(other, "single", new_tokens=3).cache, DynamicCache)
        assert handle.fused_calls == 0
        assert isinstance(generate(patched, "single", new_tokens=3).cache, PagedKVCache)
        assert handle.fused_calls == 2 * LAYERS
        # A patched model called without a PagedKVCache runs stock code.
        ids, _ = prompts("single")
        with torch.no_grad():
            torch.testing.assert_close(patched(ids).logits, other(ids).logits, atol=0, rtol=0)
        assert handle.fused_calls == 2 * LAYERS


def test_rejects_models_without_qwen3_attention():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(TypeError, match="has no Qwen3 attention module"):
        patch_model(LlamaForCausalLM(config))
    with pytest.raises(TypeError, match="has no Qwen3 attention module"):
        patch_model(torch.nn.Linear(4, 4))


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("argument", ["cache", "past_key_values"])
def test_explicit_paged_cache(argument):
    """A user-built PagedKVCache (here a growable pool: no num_blocks) through either keyword."""
    layout = HEAD_LAYOUTS[1]
    model = qwen3_model(layout)
    stock = stock_run(layout, "padded")
    cache = PagedKVCache(model.config, block_size=16)
    with patch_model(model) as handle:
        fused = generate(model, "padded", **{argument: cache})
    assert fused.cache is cache
    assert torch.equal(fused.sequences, stock.sequences)
    assert max_logit_diff(fused, stock) <= FP32_TOL
    assert handle.fused_calls == (NEW_TOKENS - 1) * LAYERS


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_chunked_prefill_fuses_the_chunks_after_the_first(attn_implementation):
    """The first chunk runs the model's own attention (nothing is cached yet); each later chunk of 48 tokens
    is one fa_fused_varlen call per layer over the rows' cached tokens (125 padded positions: 3 chunks)."""
    layout = HEAD_LAYOUTS[0]
    model = qwen3_model(layout, attn_implementation=attn_implementation)
    stock = generate(model, "padded")
    with patch_model(model, block_size=4) as handle:
        fused = generate(model, "padded", prefill_chunk_size=48)
    assert torch.equal(fused.sequences, stock.sequences)
    assert max_logit_diff(fused, stock) <= FP32_TOL
    assert handle.fused_calls == (NEW_TOKENS - 1) * LAYERS
    assert handle.varlen_calls == 2 * LAYERS


def test_beam_search_reorders_the_paged_cache():
    layout = HEAD_LAYOUTS[0]
    model = qwen3_model(layout)
    stock = generate(model, "padded", new_tokens=5, num_beams=2)
    with patch_model(model, block_size=4) as handle:
        fused = generate(model, "padded", new_tokens=5, num_beams=2)
    assert isinstance(fused.cache, PagedKVCache)
    assert torch.equal(fused.sequences, stock.sequences)
    assert max_logit_diff(fused, stock) <= FP32_TOL
    # 3 rows x 2 beams decode 4 steps after the prefill, every layer fused.
    assert handle.fused_calls == 4 * LAYERS


def test_qwen3_moe_matches_stock():
    model = moe_model()
    stock = generate(model, "padded")
    with patch_model(model, block_size=4) as handle:
        fused = generate(model, "padded")
    assert isinstance(fused.cache, PagedKVCache)
    assert torch.equal(fused.sequences, stock.sequences)
    assert max_logit_diff(fused, stock) <= FP32_TOL
    assert handle.fused_calls == (NEW_TOKENS - 1) * LAYERS


def forward_step(model, cache, ids, mask, new):
    """One forward as generate() makes it: the last ``new`` tokens, HF position ids from the mask."""
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        out = model(input_ids=ids[:, -new:], attention_mask=mask, position_ids=positions[:, -new:], cache=cache,
                    use_cache=True)
    return out.logits[:, -1]


def test_out_of_blocks_is_clear_and_other_rows_go_on():
    layout = HEAD_LAYOUTS[0]
    model = qwen3_model(layout)
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0                                   # real lengths 10 and 5
    ids = ids.masked_fill(mask == 0, 0)
    cache = PagedKVCache(model.config, block_size=4, num_blocks=6)  # 3 + 2 blocks for the prompts
    with patch_model(model) as handle:
        logits = [forward_step(model, cache, ids, mask, ids.shape[1])]
        failed_at = None
        for step in range(6):
            token = logits[-1].argmax(-1, keepdim=True)
            grown_ids, grown_mask = torch.cat((ids, token), 1), torch.cat((mask, torch.ones_like(token)), 1)
            before = ([t.clone() for layer in cache.layers for t in (layer.k_cache, layer.v_cache)],
                      cache.seq_lens.clone(), cache.block_table.clone(), cache.get_seq_length())
            try:
                logits.append(forward_step(model, cache, grown_ids, grown_mask, 1))
            except OutOfBlocksError as error:
                failed_at, message = step, str(error)
                break
            ids, mask = grown_ids, grown_mask
        # Row 1 (5 real tokens) needs a third block when it reaches 9 tokens: step 3; nothing was written.
        assert failed_at == 3
        assert "out of blocks" in message and "0 free of 6" in message
        after = ([t for layer in cache.layers for t in (layer.k_cache, layer.v_cache)], cache.seq_lens,
                 cache.block_table, cache.get_seq_length())
        assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
        assert torch.equal(before[1], after[1]) and torch.equal(before[2], after[2]) and before[3] == after[3]
        # Drop row 1: its blocks go back to the free list and row 0 keeps decoding into them.
        freed = set(cache.row_blocks[1])
        cache.batch_select_indices(torch.tensor([0]))
        ids, mask = ids[:1], mask[:1]
        for _ in range(6):
            token = logits[-1][:1].argmax(-1, keepdim=True)
            ids, mask = torch.cat((ids, token), 1), torch.cat((mask, torch.ones_like(token)), 1)
            logits.append(forward_step(model, cache, ids, mask, 1))
        assert freed & set(cache.row_blocks[0])
        assert cache.seq_lens.tolist() == [ids.shape[1]]
        assert handle.fused_calls == (3 + 6) * LAYERS
    # Row 0 all along, against the stock model over its whole sequence at once.
    with torch.no_grad():
        reference = model(input_ids=ids).logits[0]
    for step, step_logits in enumerate(logits):
        torch.testing.assert_close(step_logits[0], reference[9 + step], atol=FP32_TOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Every path HF users take: assisted decoding, attention outputs, deep copies, casts, gradients, cache reuse.

ASSISTED_MASKS = {"left": [0, 0, 1, 1, 1, 1, 1, 1], "right": [1, 1, 1, 1, 1, 1, 0, 0], "mid": [1, 1, 1, 0, 0, 1, 1, 1]}


@functools.lru_cache(maxsize=None)
def drafting_model(layout, attn_implementation):
    """A model that, as an assistant, drafts 3 tokens per round whatever its confidence (a random model's is
    low: it would draft one token per round, which its prefill gives, and never decode)."""
    torch.manual_seed(len(layout) + layout[0])
    model = finish(Qwen3ForCausalLM(Qwen3Config(**qwen3_config(layout, attn_implementation))), torch.float32)
    model.generation_config.update(assistant_confidence_threshold=0.0, num_assistant_tokens=3,
                                   num_assistant_tokens_schedule="constant")
    return model


@pytest.mark.parametrize("padding", list(ASSISTED_MASKS))
@pytest.mark.parametrize("assistant", ["same", "other"])
def test_assisted_decoding_matches_stock(assistant, padding):
    """The main model verifies several drafted tokens per step (stock path) and crops the rejected ones; the
    draft model crops its cache back into the prompt's padding each round, then decodes (fused)."""
    model = drafting_model(HEAD_LAYOUTS[0], "eager")
    draft = model if assistant == "same" else drafting_model(HEAD_LAYOUTS[1], "sdpa")
    mask = torch.tensor([ASSISTED_MASKS[padding]])
    ids = torch.randint(1, VOCAB, mask.shape, generator=torch.Generator().manual_seed(3)).masked_fill(mask == 0, 0)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                  assistant_model=draft, return_dict_in_generate=True, output_scores=True)
    stock = model.generate(**kwargs)
    with patch_model(model, block_size=4) as handle, patch_model(draft, block_size=4) as draft_handle, \
            CountFusedCalls() as counter:
        fused = model.generate(**kwargs)
    assert torch.equal(fused.sequences, stock.sequences)
    assert len(fused.scores) == len(stock.scores)
    assert max((a - b).abs().max().item() for a, b in zip(fused.scores, stock.scores)) <= FP32_TOL
    assert isinstance(fused.cache, PagedKVCache)
    assert_cache_matches_stock(fused.cache, stock.cache)
    assert draft_handle.fused_calls > 0
    # The main model verifies each round's drafts in one fa_fused_varlen call per layer.
    rounds = handle.varlen_calls // LAYERS
    assert rounds > 0 and handle.varlen_calls == rounds * LAYERS
    # (The same model as its own assistant has one handle.)
    handles = {id(handle): handle, id(draft_handle): draft_handle}.values()
    assert counter.varlen_calls == sum(h.varlen_calls for h in handles)


def attention_steps(model, cache, steps=3, **kwargs):
    """Prefill of the padded prompts, then ``steps`` greedy decode steps: (logits, attentions) of each."""
    ids, mask = prompts("padded")
    outputs, new = [], ids.shape[1]
    for _ in range(steps + 1):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        with torch.no_grad():
            out = model(input_ids=ids[:, -new:], attention_mask=mask, position_ids=positions[:, -new:], cache=cache,
                        use_cache=True, **kwargs)
        outputs.append((out.logits[:, -1], out.attentions))
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        ids, mask, new = torch.cat((ids, token), 1), torch.cat((mask, torch.ones_like(token)), 1), 1
    return outputs


def assert_attentions_match(fused, stock):
    """Per step and layer, the same [B, H, q, seen + q] weights as stock (zero on padding, as stock's)."""
    assert fused is not None and len(fused) == len(stock)
    for fused_step, stock_step in zip(fused, stock, strict=True):
        assert len(fused_step) == len(stock_step) == LAYERS
        for ours, theirs in zip(fused_step, stock_step):
            assert ours.shape == theirs.shape
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("requested", ["kwarg", "config"])
def test_forward_attentions_match_stock(requested):
    """output_attentions as a kwarg or in the config: each decode step takes the stock path, with stock's
    attention layout over every seen position."""
    model = qwen3_model(HEAD_LAYOUTS[0], attn_implementation="eager")
    kwargs = {"output_attentions": True} if requested == "kwarg" else {}
    model.config.output_attentions = requested == "config"
    try:
        stock = attention_steps(model, DynamicCache(config=model.config), **kwargs)
        with patch_model(model, block_size=4) as handle:
            fused = attention_steps(model, PagedKVCache(model.config, block_size=4), **kwargs)
    finally:
        model.config.output_attentions = False
    assert handle.fused_calls == 0
    for (fused_logits, fused_attentions), (stock_logits, stock_attentions) in zip(fused, stock, strict=True):
        torch.testing.assert_close(fused_logits, stock_logits, atol=FP32_TOL, rtol=0)
        assert_attentions_match([fused_attentions], [stock_attentions])
    assert stock[-1][1][0].shape[-2:] == (1, prompts("padded")[0].shape[1] + 3)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_attentions_match_stock(num_beams):
    model = qwen3_model(HEAD_LAYOUTS[0], attn_implementation="eager")
    stock = generate(model, "padded", new_tokens=4, num_beams=num_beams, output_attentions=True)
    with patch_model(model, block_size=4) as handle:
        fused = generate(model, "padded", new_tokens=4, num_beams=num_beams, output_attentions=True)
        plain = generate(model, "padded", new_tokens=4, num_beams=num_beams)
    assert torch.equal(fused.sequences, stock.sequences)
    assert_attentions_match(fused.attentions, stock.attentions)
    assert plain.attentions is None and torch.equal(plain.sequences, stock.sequences)
    assert handle.fused_calls == 3 * LAYERS    # the run without attentions only


def test_deepcopy_of_a_patched_model_is_patched_with_its_own_weights():
    """As TRL's create_reference_model does: the copy decodes fused with its own weights, by its own handle."""
    layout = HEAD_LAYOUTS[0]
    torch.manual_seed(0)
    model = finish(Qwen3ForCausalLM(Qwen3Config(**qwen3_config(layout))), torch.float32)  # qwen3_model's weights
    handle = patch_model(model, block_size=4)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for param in model.parameters():
            param.neg_()                # a copy computing with the original's weights would show it
    copy_handle = patch_model(copied, block_size=4)
    assert copy_handle is not handle and copy_handle.active
    assert all(layer.self_attn.forward._torch_qwen_fused_patch is copy_handle for layer in copied.model.layers)
    fused = generate(copied, "padded")
    stock = stock_run(layout, "padded")
    assert torch.equal(fused.sequences, stock.sequences)
    assert max_logit_diff(fused, stock) <= FP32_TOL
    assert copy_handle.fused_calls == (NEW_TOKENS - 1) * LAYERS and handle.fused_calls == 0
    copy_handle.remove()
    assert all("forward" not in layer.self_attn.__dict__ for layer in copied.model.layers)
    assert "_prepare_cache_for_generation" not in copied.__dict__
    assert not copied.model._forward_pre_hooks and not copied.model._forward_hooks
    assert handle.active and all("forward" in layer.self_attn.__dict__ for layer in model.model.layers)
    handle.remove()


def test_cast_after_patch_follows_the_model():
    """patch_model, then model.to(bfloat16): caches in bf16, RoPE tables from the cast model's inv_freq."""
    torch.manual_seed(0)
    model = finish(Qwen3ForCausalLM(Qwen3Config(**qwen3_config(HEAD_LAYOUTS[0]))), torch.float32)
    handle = patch_model(model, block_size=4)
    model.to(torch.bfloat16)
    with handle:
        with pytest.warns(UserWarning, match="rotary embedding differs"):
            fused = generate(model, "padded")
    assert fused.cache.layers[0].k_cache.dtype == torch.bfloat16 == fused.cache.layers[0].keys.dtype
    assert handle.fused_calls == (NEW_TOKENS - 1) * LAYERS
    width = prompts("padded")[0].shape[1]
    forced = fused.sequences[:, width:].tolist()
    stock = generate(model, "padded", prefix_allowed_tokens_fn=lambda row, seq: [forced[row][seq.shape[0] - width]])
    assert torch.equal(fused.sequences, stock.sequences)
    scale = max(x.float().abs().max().item() for x in stock.logits)
    assert max_logit_diff(fused, stock) <= 0.05 * scale


def test_patch_model_rejects_none():
    with pytest.raises(TypeError, match="patch_model: model must be .* got NoneType"):
        patch_model(None)


def test_meta_model_patches_without_reading_values():
    """A model built on the meta device patches (nothing is read from its tensors); once materialized and
    loaded, it decodes fused, on the device and in the dtype it then has."""
    layout = HEAD_LAYOUTS[0]
    real = qwen3_model(layout)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config(**qwen3_config(layout)))
    with patch_model(model, block_size=4) as handle:
        model.to_empty(device="cpu")
        model.load_state_dict(real.state_dict())
        with torch.no_grad():
            for name in ("inv_freq", "original_inv_freq"):   # buffers outside the state dict
                getattr(model.model.rotary_emb, name).copy_(getattr(real.model.rotary_emb, name))
        model.generation_config.update(eos_token_id=None, pad_token_id=0)
        fused = generate(model.eval(), "padded")
    stock = stock_run(layout, "padded")
    assert torch.equal(fused.sequences, stock.sequences)
    assert max_logit_diff(fused, stock) <= FP32_TOL
    assert handle.fused_calls == (NEW_TOKENS - 1) * LAYERS


def test_forward_under_grad_takes_the_stock_path():
    """fa_fused is inference-only: a decode forward outside torch.no_grad (the parameters require grad, as
    loaded) runs stock code, with stock's logits and gradients; generate() (under no_grad) still fuses."""
    model = qwen3_model(HEAD_LAYOUTS[0])
    ids, mask = prompts("padded")
    token = torch.randint(1, VOCAB, (ids.shape[0], 1), generator=torch.Generator().manual_seed(9))
    grown = torch.cat((mask, torch.ones_like(token)), 1)
    position = grown.sum(-1, keepdim=True) - 1
    weight = model.model.layers[0].self_attn.q_proj.weight
    results = []
    with patch_model(model, block_size=4) as handle:
        for cache in (DynamicCache(config=model.config), PagedKVCache(model.config, block_size=4)):
            forward_step(model, cache, ids, mask, ids.shape[1])        # prefill under no_grad
            assert torch.is_grad_enabled() and weight.requires_grad
            logits = model(input_ids=token, attention_mask=grown, position_ids=position, cache=cache,
                           use_cache=True).logits
            logits.square().mean().backward()
            results.append((logits.detach(), weight.grad.clone()))
            model.zero_grad(set_to_none=True)
        assert handle.fused_calls == 0
        generate(model, "single", new_tokens=3)
        assert handle.fused_calls == 2 * LAYERS
    (paged_logits, paged_grad), (stock_logits, stock_grad) = results[1], results[0]
    torch.testing.assert_close(paged_logits, stock_logits, atol=FP32_TOL, rtol=0)
    torch.testing.assert_close(paged_grad, stock_grad, atol=1e-5, rtol=1e-4)


def test_cache_reused_by_a_second_generate():
    """generate() continued from the cache a first generate() returned: the paged pool grows past the size
    the first call gave it, the continuation prefill reads it (stock path), then decodes fused."""
    model = qwen3_model(HEAD_LAYOUTS[0])
    _, mask = prompts("padded")
    more = torch.randint(1, VOCAB, (mask.shape[0], 3), generator=torch.Generator().manual_seed(4))

    def twice():
        first = generate(model, "padded", new_tokens=4)
        ids = torch.cat((first.sequences, more), 1)
        grown = torch.cat((mask, torch.ones(mask.shape[0], ids.shape[1] - mask.shape[1], dtype=mask.dtype)), 1)
        second = model.generate(input_ids=ids, attention_mask=grown, cache=first.cache, max_new_tokens=4,
                                do_sample=False, return_dict_in_generate=True, output_logits=True)
        return first, second

    stock = twice()
    with patch_model(model, block_size=4) as handle:
        fused = twice()
    for ours, theirs in zip(fused, stock):
        assert torch.equal(ours.sequences, theirs.sequences)
        assert max_logit_diff(ours, theirs) <= FP32_TOL
    assert fused[1].cache is fused[0].cache
    assert_cache_matches_stock(fused[1].cache, stock[1].cache)
    assert handle.fused_calls == 2 * 3 * LAYERS


def test_freed_row_restarts_as_a_left_padded_row():
    """A serving loop outside generate(): row 1 finishes and is freed, a new prompt starts in it while row 0
    goes on. The freed row's old positions are padding in the mask; stock, given the same inputs with a
    DynamicCache (which keeps the old tokens, masked), gives the same logits at every step."""
    model = qwen3_model(HEAD_LAYOUTS[0])
    generator = torch.Generator().manual_seed(12)
    ids = torch.randint(1, VOCAB, (2, 6), generator=generator)
    mask = torch.ones_like(ids)
    prompt = torch.randint(1, VOCAB, (1, 3), generator=generator)
    paged, dynamic = PagedKVCache(model.config, block_size=4), DynamicCache(config=model.config)
    with patch_model(model) as handle:
        def step(ids, mask, new):
            fused = forward_step(model, paged, ids, mask, new)
            torch.testing.assert_close(fused, forward_step(model, dynamic, ids, mask, new), atol=FP32_TOL, rtol=0)
            token = fused.argmax(-1, keepdim=True)
            return torch.cat((ids, token), 1), torch.cat((mask, torch.ones_like(token)), 1)

        ids, mask = step(ids, mask, ids.shape[1])
        for _ in range(2):
            ids, mask = step(ids, mask, 1)
        paged.free_rows([1])
        assert paged.seq_lens.tolist() == [8, 0] and paged.get_seq_length() == 8
        # One 3-token step: row 0's next token after 2 padding slots, row 1's new prompt after its old positions.
        chunk = torch.cat((torch.cat((torch.zeros(1, 2, dtype=ids.dtype), ids[:1, -1:]), 1), prompt))
        chunk_mask = torch.tensor([[0, 0, 1], [1, 1, 1]])
        ids = torch.cat((ids[:, :-1], chunk), 1)
        mask = torch.cat((torch.stack((mask[0, :-1], torch.zeros_like(mask[1, :-1]))), chunk_mask), 1)
        ids, mask = step(ids, mask, 3)
        assert paged.seq_lens.tolist() == [9, 3]
        for _ in range(3):
            ids, mask = step(ids, mask, 1)
        assert paged.seq_lens.tolist() == [12, 6]
        assert handle.fused_calls == (2 + 3) * LAYERS


def test_several_tokens_with_padding_among_them_match_stock():
    """A 3-token step over cached rows where one row's middle token is padding: the real tokens are packed into
    one fa_fused_varlen call per layer (the padding is neither written nor attended to), and the logits of every
    real position are stock's."""
    layout = HEAD_LAYOUTS[1]
    model = qwen3_model(layout)
    ids, mask = prompts("padded")
    step_ids = torch.randint(1, VOCAB, (ids.shape[0], 3), generator=torch.Generator().manual_seed(9))
    step_mask = torch.ones_like(step_ids)
    step_mask[1, 1] = 0
    full_mask = torch.cat((mask, step_mask), 1)
    positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)

    def run(cache):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=positions[:, : ids.shape[1]], cache=cache)
            return model(input_ids=step_ids, attention_mask=full_mask, position_ids=positions[:, ids.shape[1]:],
                         cache=cache).logits

    stock = run(DynamicCache(config=model.config))
    with patch_model(model, block_size=8) as handle:
        cache = PagedKVCache(model.config, block_size=8)
        fused = run(cache)
    assert handle.varlen_calls == LAYERS
    real = step_mask.bool()
    torch.testing.assert_close(fused[real], stock[real], atol=FP32_TOL, rtol=0)
    assert cache.seq_lens.tolist() == (torch.tensor(PROMPTS["padded"]) + step_mask.sum(1)).tolist()


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3fn", "e5m2"])
def test_fp8_cache_decodes_as_the_stock_path_over_the_same_cache(cache_dtype):
    """With kv_cache_dtype=fp8 the prefill stores quantized K/V (scales calibrated per layer from it) and each
    decode step is one fa_fused call over them. The stock attention over the same fp8 cache (what
    output_attentions takes) gives the same tokens, and logits within fp8's rounding of the new tokens' K/V."""
    layout = HEAD_LAYOUTS[0]
    model = qwen3_model(layout)
    with patch_model(model, block_size=4, kv_cache_dtype=cache_dtype) as handle:
        fused = generate(model, "padded")
        assert handle.fused_calls == (NEW_TOKENS - 1) * LAYERS
        stock_over_fp8 = generate(model, "padded", output_attentions=True)
        assert handle.fused_calls == (NEW_TOKENS - 1) * LAYERS          # that run took the stock path
    assert fused.cache.layers[0].k_cache.dtype == cache_dtype
    assert torch.equal(fused.sequences, stock_over_fp8.sequences)
    assert max_logit_diff(fused, stock_over_fp8) <= 2e-2
    # Against the unquantized stock model: a figure, not a bound (fp8 has 2 or 3 mantissa bits).
    stock = stock_run(layout, "padded")
    agreement = (fused.sequences == stock.sequences).float().mean().item()
    print(f"{cache_dtype}: token agreement with the fp32 stock model {agreement:.2f}, "
          f"max |logit diff| {max_logit_diff(fused, stock):.3g}")


def test_fp8_scales_are_calibrated_from_the_prefill_or_given():
    layout = HEAD_LAYOUTS[0]
    model = qwen3_model(layout)
    stock = stock_run(layout, "padded")
    _, mask = prompts("padded")
    real = mask.bool()
    with patch_model(model, block_size=4, kv_cache_dtype=torch.float8_e4m3fn):
        calibrated = generate(model, "padded")
        given = PagedKVCache(model.config, block_size=4, cache_dtype=torch.float8_e4m3fn, k_scales=[0.5, 0.25],
                             v_scales=[0.125, 1.0])
        generate(model, "padded", cache=given)
    # Layer 0's prefill K is stock's (later layers see attention over fp8 values): its absmax maps onto 448.
    prompt_keys = stock.cache.layers[0].keys[:, :, : real.shape[1]].transpose(1, 2)[real]
    torch.testing.assert_close(calibrated.cache.layers[0].k_scale, prompt_keys.abs().max().reshape(1) / 448.0,
                               rtol=1e-6, atol=0)
    for layer in calibrated.cache.layers:   # every layer: its largest stored K and V are fp8's largest value
        for pool in (layer.k_cache, layer.v_cache):
            assert pool.float().abs().max() == 448.0
    assert [float(layer.k_scale) for layer in given.layers] == [0.5, 0.25]
    assert [float(layer.v_scale) for layer in given.layers] == [0.125, 1.0]
    assert calibrated.cache.bytes_per_block() * 4 == PagedKVCache(model.config, block_size=4).bytes_per_block()
    with pytest.raises(ValueError, match="k_scales must be 2 finite positive floats"):
        PagedKVCache(model.config, cache_dtype=torch.float8_e4m3fn, k_scales=[1.0])
