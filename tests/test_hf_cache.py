"""PagedKVCache on its own (no model): block allocation and reuse, sizing and growth, and the HF ``Cache``
API: crop by seen positions, ``keys``/``values`` in DynamicCache's layout, free_rows, deepcopy."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

from torch_qwen_fused.hf import OutOfBlocksError, PagedKVCache  # noqa: E402


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
                         max_memory=10 * 2 * 3 * 8 * 2 * 16 * 2, cache_dtype=torch.bfloat16)
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


def filled_cache(mask, block_size=2, seed=0):
    """A one-layer cache after one step of ``mask.shape[1]`` tokens per row (mask: 1 real, 0 padding), the
    keys it was given (values = -keys) and those keys as DynamicCache would hold them."""
    batch, length = mask.shape
    cache = PagedKVCache(num_layers=1, num_kv_heads=2, head_dim=16, block_size=block_size)
    keys = torch.randn(batch, 2, length, 16, generator=torch.Generator().manual_seed(seed))
    cache.begin_forward(batch, length, attention_mask=mask)
    cache.update(keys, -keys, 0)
    cache.end_forward()
    return cache, keys


# Right padding, mid padding, a row of padding only, all real.
MASK = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])


def test_keys_and_values_have_dynamic_cache_layout():
    """layers[i].keys/.values: [B, Hkv, seen, D] as DynamicCache holds them, zeros where padding was."""
    cache, keys = filled_cache(MASK)
    stored = MASK.bool()
    layer = cache.layers[0]
    assert layer.keys.shape == keys.shape and layer.values.shape == keys.shape
    assert cache.get_seq_length() == MASK.shape[1] and torch.equal(cache.stored_positions, stored)
    assert cache.seq_lens.tolist() == MASK.sum(1).tolist()
    expected = keys * stored[:, None, :, None]
    torch.testing.assert_close(layer.keys, expected, atol=0, rtol=0)
    torch.testing.assert_close(layer.values, -expected, atol=0, rtol=0)
    assert layer.k_cache.shape[1:] == (2, 2, 16)      # the pool: [num_blocks, block_size, Hkv, D]


@pytest.mark.parametrize("removed", [1, 2, 3, 6])
def test_crop_drops_exactly_the_tokens_of_the_cropped_positions(removed):
    """crop(-n) removes the last n seen positions: a row loses only the tokens stored there (none where
    they were padding), and keeps only the blocks its remaining tokens need."""
    cache, keys = filled_cache(MASK)
    cache.crop(-removed)
    keep = MASK.shape[1] - removed
    stored = MASK[:, :keep].bool()
    assert cache.get_seq_length() == keep and torch.equal(cache.stored_positions, stored)
    assert cache.seq_lens.tolist() == stored.sum(1).tolist()
    assert [len(blocks) for blocks in cache.row_blocks] == [-(-n // 2) for n in stored.sum(1).tolist()]
    torch.testing.assert_close(cache.layers[0].keys, keys[:, :, :keep] * stored[:, None, :, None], atol=0, rtol=0)
    # The next token lands right after each row's kept tokens.
    new = torch.randn(4, 2, 1, 16)
    plan = cache.begin_forward(4, 1, attention_mask=torch.cat((stored, torch.ones(4, 1, dtype=torch.bool)), 1))
    cache.update(new, -new, 0)
    cache.end_forward()
    assert plan.seq_lens.tolist() == (stored.sum(1) + 1).tolist()
    torch.testing.assert_close(cache.layers[0].keys[:, :, -1], new[:, :, 0], atol=0, rtol=0)


def test_free_rows_keeps_the_counts_it_reports():
    """A freed row holds no token; its positions stay seen, as padding, and a mask that calls them real is
    refused (stock would attend to tokens this cache no longer has)."""
    cache, keys = filled_cache(MASK)
    free_before = cache.num_free_blocks
    cache.free_rows([1, 1])
    assert cache.num_free_blocks == free_before + 2 and cache.row_blocks[1] == []
    assert cache.seq_lens.tolist() == [4, 0, 0, 6] and cache.get_seq_length() == 6
    assert not cache.stored_positions[1].any()
    assert not cache.layers[0].keys[1].any()
    with pytest.raises(IndexError, match="row 4"):
        cache.free_rows([0, 4])
    assert cache.seq_lens.tolist() == [4, 0, 0, 6]      # nothing freed by the refused call
    old_positions_real = torch.cat((cache.stored_positions, torch.ones(4, 1, dtype=torch.bool)), 1)
    old_positions_real[1] = True
    with pytest.raises(ValueError, match="attention_mask marks position 0 of row 1"):
        cache.begin_forward(4, 1, attention_mask=old_positions_real)
    with pytest.raises(ValueError, match="attention_mask is None"):
        cache.begin_forward(4, 1)
    assert cache.current_plan is None and cache.seq_lens.tolist() == [4, 0, 0, 6]
    plan = cache.begin_forward(4, 1, attention_mask=torch.cat((cache.stored_positions, torch.ones(4, 1)), 1))
    assert plan.mask_matches_cache and plan.seq_lens.tolist() == [5, 1, 1, 7]


def test_mask_hiding_stored_tokens_is_not_fused():
    """A mask that hides a stored token asks for what the paged decode (which reads every stored token)
    cannot give: the plan says so, and the patched model takes the stock path."""
    cache, _ = filled_cache(MASK)
    hide = torch.cat((MASK, torch.ones(4, 1, dtype=MASK.dtype)), 1)
    hide[3, 0] = 0
    assert not cache.begin_forward(4, 1, attention_mask=hide).mask_matches_cache


def test_deepcopy_is_independent():
    cache, keys = filled_cache(MASK)
    copied = copy.deepcopy(cache)
    assert all(layer._cache() is copied for layer in copied.layers)
    copied.crop(-3)
    new = torch.randn(4, 2, 1, 16)
    mask = torch.cat((copied.stored_positions, torch.ones(4, 1, dtype=torch.bool)), 1)
    copied.begin_forward(4, 1, attention_mask=mask)
    copied.update(new, -new, 0)
    copied.end_forward()
    assert cache.get_seq_length() == 6 and cache.seq_lens.tolist() == MASK.sum(1).tolist()
    torch.testing.assert_close(cache.layers[0].keys, keys * MASK.bool()[:, None, :, None], atol=0, rtol=0)
    torch.testing.assert_close(copied.layers[0].keys[:, :, -1], new[:, :, 0], atol=0, rtol=0)


def test_growable_pool_with_an_initial_size():
    cache = PagedKVCache(num_layers=1, num_kv_heads=1, head_dim=16, block_size=2, num_blocks=1, growable=True)
    cache.begin_forward(1, 5)
    cache.end_forward()
    assert cache.num_blocks >= 3 and cache.seq_lens.tolist() == [5]
    with pytest.raises(ValueError, match="max_memory"):
        PagedKVCache(num_layers=1, num_kv_heads=1, head_dim=16, max_memory=1 << 20, growable=True)
    fixed = PagedKVCache(num_layers=1, num_kv_heads=1, head_dim=16, block_size=2, num_blocks=1)
    with pytest.raises(OutOfBlocksError):
        fixed.begin_forward(1, 5)


def test_block_table_rows_and_the_table_the_op_reads():
    from torch_qwen_fused.hf import BlockAllocator, BlockTable

    allocator, table = BlockAllocator(8), BlockTable(block_size=4)
    table.reset(2)
    added = table.grow(table.missing_blocks([5, 1]), allocator)        # 5 tokens: 2 blocks, 1 token: 1 block
    assert table.rows == [[0, 1], [2]] and added == [(0, 0), (0, 1), (1, 2)]
    assert table.tensor.tolist() == [[0, 1], [2, 0]] and table.tensor.dtype == torch.int32
    # token 5 of row 0 is offset 1 of its second block (physical 1): slot 1 * 4 + 1
    assert table.slots(torch.tensor([[5], [0]])).tolist() == [[5], [8]]
    # Row 0 twice (beam search): the copy gets fresh blocks, row 1's block goes back to the free list first.
    assert table.copies_needed([0, 0]) == (2, 1)
    sources, targets = table.select([0, 0], allocator)
    assert table.rows[0] == [0, 1] and sources == [0, 1] and len(targets) == 2 and 2 in targets
    table.truncate([4, 0], allocator)
    assert table.rows == [[0], []] and allocator.num_free == 7
    table.undo([(0, 0)], allocator)
    assert table.rows == [[], []] and allocator.num_free == 8
