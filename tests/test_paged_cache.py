"""PagedKVCache on its own (no model): block allocation and reuse, sizing and growth, and the HF ``Cache``
API: crop by seen positions, ``keys``/``values`` in DynamicCache's layout, free_rows, deepcopy."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

from torch_qwen_fused.paged_cache import OutOfBlocksError, PagedKVCache  # noqa: E402


def test_paged_cache_allocator_free_and_reuse():
    cache = PagedKVCache(num_layers=1, num_kv_heads=2, head_dim=16, block_size=4, num_blocks=6)

    def step(batch, length, **kwargs):
        plan = cache.begin_forward(batch, length, **kwargs)
        cache.end_forward()
        return plan

    plan = step(2, 6)                         # rows of 6 tokens: 2 blocks each
    assert cache.row_blocks == [[0, 1], [2, 3]] and cache.num_free_blocks == 2
    assert plan.slots[1].tolist() == [8, 9, 10, 11, 12, 13]
    # A step that never commits (its forward raised) is undone by the next one.
    cache.begin_forward(2, 3)
    assert cache.num_free_blocks == 0
    step(2, 2)
    assert cache.seq_lens.tolist() == [8, 8] and cache.num_free_blocks == 2 and cache.get_seq_length() == 8
    step(2, 1)                                # 9 tokens: the last 2 blocks
    with pytest.raises(OutOfBlocksError, match="needs 2 more block"):
        cache.begin_forward(2, 4)
    assert cache.seq_lens.tolist() == [9, 9] and cache.current_plan is None
    old_row0 = set(cache.row_blocks[0])
    cache.free_rows([0])
    assert cache.seq_lens.tolist() == [0, 9] and cache.num_free_blocks == 3
    # Row 0 starts over in freed blocks (its old positions are padding now), row 1 takes one too.
    step(2, 4, attention_mask=torch.cat((cache.stored_positions, torch.ones(2, 4, dtype=torch.bool)), dim=1))
    assert cache.seq_lens.tolist() == [4, 13]
    assert set(cache.row_blocks[0]) | {cache.row_blocks[1][3]} <= old_row0
    # Padding is not stored: the left-padded row gets only its 2 real tokens.
    cache.reset()
    assert cache.num_free_blocks == 6 and cache.get_seq_length() == 0
    plan = step(2, 3, attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]))
    assert cache.seq_lens.tolist() == [3, 2] and plan.slots[1, 0] == -1


def test_paged_cache_sizing_and_growth():
    cache = PagedKVCache(num_layers=3, num_kv_heads=2, head_dim=16, block_size=8,
                         max_memory=10 * 2 * 3 * 8 * 2 * 16 * 2, dtype=torch.bfloat16)
    cache.begin_forward(1, 5)
    cache.end_forward()
    assert cache.num_blocks == 10 and cache.layers[2].k_cache.shape == (10, 8, 2, 16)
    assert cache.layers[0].v_cache.dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="patch_model"):
        cache.update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), 0)
    with pytest.raises(ValueError, match="not both"):
        PagedKVCache(num_layers=1, num_kv_heads=1, head_dim=16, num_blocks=2, max_memory=1 << 20)
    # Without num_blocks/max_memory the pool grows, keeping what it holds.
    growable = PagedKVCache(num_layers=1, num_kv_heads=1, head_dim=16, block_size=2)
    growable.begin_forward(1, 3)
    keys = torch.randn(1, 1, 3, 16)
    growable.update(keys, -keys, 0)
    growable.end_forward()
    first = growable.num_blocks
    growable.begin_forward(1, 4 * first)
    growable.end_forward()
    assert growable.num_blocks > first and growable.seq_lens.tolist() == [3 + 4 * first]
    held = growable.layers[0].k_cache[growable.row_blocks[0]].flatten(0, 1)[:3, 0]
    torch.testing.assert_close(held, keys[0, 0], atol=0, rtol=0)
