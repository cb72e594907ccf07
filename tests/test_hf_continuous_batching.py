"""HF continuous batching (``generate_batch``) on a patched Qwen3: stock's tokens, every step fused on HF's pages.

The stock run is the same model unpatched (HF's own ``PagedAttentionCache`` read and written by ``cache.update``, SDPA
over every request's keys); patched, no step may reach ``cache.update`` (each layer is one ``fa_fused`` /
``fa_fused_varlen`` call on HF's pages), HF's block-table decode path must be on, and the tokens must be stock's (fp32).
"""

import pytest
import torch

pytest.importorskip("transformers")

from test_hf_patch import qwen3_model  # noqa: E402
from torch_qwen_fused.hf import patch_model  # noqa: E402
from transformers import GenerationConfig  # noqa: E402
from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: E402
from transformers.generation.continuous_batching.cache import PagedAttentionCache  # noqa: E402

LAYOUT = (4, 2, 32, 64)
PAGE_SIZE = 16
# Ragged prompts crossing page boundaries; with 24 tokens per step the longer prompts are prefilled in chunks over
# several steps, mixed with the shorter ones' decode tokens, and the two with one prefix may share its pages.
PROMPT_LENGTHS = [3, 17, 40, 40, 61]
NEW_TOKENS = 12
# A small cache: by default HF sizes it from the free memory (GiBs, ~30 s to zero on this machine).
NUM_BLOCKS = 64


def prompts():
    generator = torch.Generator().manual_seed(7)
    inputs = [torch.randint(1, 512, (length,), generator=generator).tolist() for length in PROMPT_LENGTHS]
    inputs[3][:32] = inputs[2][:32]
    return inputs


def generate_batch(model, persistent_manager=False, **config):
    generation_config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1)
    config = ContinuousBatchingConfig(page_size=PAGE_SIZE, num_blocks=NUM_BLOCKS, **config)
    outputs = model.generate_batch(prompts(), generation_config=generation_config, continuous_batching_config=config,
                                   persistent_manager=persistent_manager)
    return [output.generated_tokens for output in outputs.values()]


class Calls:
    """Records the results of a method's calls (on every instance: the generation runs in HF's own thread)."""

    def __init__(self, monkeypatch, owner, name):
        self.results = []
        original = getattr(owner, name)

        def recorded(*args, **kwargs):
            self.results.append(original(*args, **kwargs))
            return self.results[-1]

        monkeypatch.setattr(owner, name, recorded)

    @property
    def count(self):
        return len(self.results)


# 24 tokens per step: prompts prefilled in chunks over several steps (the later chunks read the earlier ones from the
# cache) and the fourth prompt reuses the third's first two pages (HF's prefix sharing); 512: one prefill step.
@pytest.mark.parametrize("max_batch_tokens, shared_prefix", [(24, 2 * PAGE_SIZE), (512, 0)])
def test_generate_batch_matches_stock_and_every_step_is_fused(monkeypatch, max_batch_tokens, shared_prefix):
    model = qwen3_model(LAYOUT)
    stock = generate_batch(model, max_batch_tokens=max_batch_tokens)
    assert all(len(tokens) == NEW_TOKENS for tokens in stock)
    stock_updates = Calls(monkeypatch, PagedAttentionCache, "update")
    block_tables = Calls(monkeypatch, PagedAttentionCache, "fill_block_table")
    prefix_matches = Calls(monkeypatch, PagedAttentionCache, "search_prefix_match")
    with patch_model(model) as handle:
        patched = generate_batch(model, max_batch_tokens=max_batch_tokens)
    assert patched == stock
    assert max(prefix_matches.results) == shared_prefix
    assert stock_updates.count == 0, "a layer ran stock attention over HF's cache"
    assert block_tables.count > 0, "HF's block-table decode path stayed off"
    assert handle.fused_calls > 0 and handle.fused_calls % model.config.num_hidden_layers == 0
    assert handle.varlen_calls > 0 and handle.varlen_calls % model.config.num_hidden_layers == 0


def test_decode_path_left_off_by_the_user_is_fused_from_the_indices(monkeypatch):
    model = qwen3_model(LAYOUT)
    stock = generate_batch(model, max_blocks_per_request=0)
    block_tables = Calls(monkeypatch, PagedAttentionCache, "fill_block_table")
    with patch_model(model) as handle:
        patched = generate_batch(model, max_blocks_per_request=0)
    assert patched == stock
    assert block_tables.count == 0
    assert handle.fused_calls > 0 and handle.varlen_calls > 0


def test_removed_patch_leaves_generate_batch_stock(monkeypatch):
    model = qwen3_model(LAYOUT)
    patch_model(model).remove()
    block_tables = Calls(monkeypatch, PagedAttentionCache, "fill_block_table")
    stock_updates = Calls(monkeypatch, PagedAttentionCache, "update")
    generate_batch(model)
    assert block_tables.count == 0 and stock_updates.count > 0


def test_removed_patch_gives_a_kept_manager_back_to_stock(monkeypatch):
    # A manager kept on the model (persistent_manager=True) was built with the block-table decode path the patch turned
    # on; stock attention cannot serve that path (it neither writes the cache nor reads the table), so removing the
    # patch must give the manager HF's setting back.
    model = qwen3_model(LAYOUT)
    stock = generate_batch(model)
    with patch_model(model) as handle:
        assert generate_batch(model, persistent_manager=True) == stock
        assert handle.fused_calls > 0
    kept = model._cached_continuous_batching_manager
    block_tables = Calls(monkeypatch, PagedAttentionCache, "fill_block_table")
    stock_updates = Calls(monkeypatch, PagedAttentionCache, "update")
    try:
        assert generate_batch(model, persistent_manager=True) == stock
        assert model._cached_continuous_batching_manager is kept
        assert block_tables.count == 0 and stock_updates.count > 0
        stock_steps = stock_updates.count
        # Patched again: the manager kept by the stock run keeps its batch processor, without the block table; its
        # steps are fused from HF's indices.
        with patch_model(model) as handle:
            assert generate_batch(model, persistent_manager=True) == stock
            assert handle.fused_calls > 0 and stock_updates.count == stock_steps
    finally:
        model.destroy_cached_continuous_batching_manager()


def test_patch_is_not_removed_under_a_running_manager():
    model = qwen3_model(LAYOUT)
    handle = patch_model(model)
    manager = model.init_continuous_batching(continuous_batching_config=ContinuousBatchingConfig(
        page_size=PAGE_SIZE, num_blocks=NUM_BLOCKS))
    manager.start()
    try:
        with pytest.raises(RuntimeError, match="running"):
            handle.remove()
        assert handle.active
    finally:
        manager.stop(block=True, timeout=10)
    handle.remove()
    assert not handle.active and manager.continuous_batching_config.max_blocks_per_request == 0
    manager.destroy()
