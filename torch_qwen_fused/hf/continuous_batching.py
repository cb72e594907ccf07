"""HF continuous batching (``generate_batch``, ``init_continuous_batching``, ``transformers serve
--continuous-batching``) through the fused ops, on HF's own pages.

HF's ``PagedAttentionCache`` keeps, per full-attention layer, K and V pages of ``page_size`` tokens in one flat buffer:
each block holds every layer's K page then V page (``FullAttentionCacheAllocator.register_cache_tensor``). One layer's
K pages are therefore a ``[num_blocks, page_size, Hkv, D]`` view whose blocks lie ``2 * layers`` pages apart, and its V
pages the same view one page further: what ``fa_fused`` takes as ``k_cache`` / ``v_cache`` (blocks further apart than
their size, interleaved, never overlapping). HF's step arguments map onto the op's:

* ``cu_seq_lens_q`` -> ``query_start_loc``; ``diff(cu_seq_lens_k)`` -> ``seq_lens`` (each request's context, its new
  tokens included);
* ``write_index`` (rows of the layer's token view: ``block * block_physical_stride + offset``) -> ``slot_mapping``
  (``block * page_size + offset``; the padding tokens' trash row -> -1);
* the block table: HF's decode fast path passes one (page indices, ``-1`` past a row's blocks) -> block ids; otherwise
  each row's first token of every page in ``read_index`` (or ``write_index`` when nothing is read: new prompts);
* RoPE: the model's own ``position_embeddings`` of the step's tokens, used as a table indexed ``0..T-1``.

``plan_batch_step`` computes that once per forward step (from the base model's arguments); ``fused_batch_attention``
is one layer's call. Prefix-shared blocks stay shared: the table points at whatever block HF gave each row.
"""

import copy
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.cache import PagedAttentionCache
from transformers.generation.continuous_batching.cache_allocators import FullAttentionCacheAllocator
from transformers.generation.continuous_batching.initialization import resolve_using_hints, resolve_without_hints

from .decode import project_qkv

__all__ = ["BatchStep", "is_continuous_batching_cache", "plan_batch_step", "fused_batch_attention",
           "enable_block_table_decode", "disable_block_table_decode", "layer_pages"]

_PAGES = weakref.WeakKeyDictionary()   # allocator -> {layer_idx: (k_cache, v_cache)}


@dataclass
class BatchStep:
    """One continuous-batching forward step, in the op's terms (computed once for all layers)."""

    cache: object                    # the PagedAttentionCache the step runs on
    allocator: object                # its full-attention allocator
    decode: bool                     # one new token per request: fa_fused, else fa_fused_varlen
    block_table_path: bool           # HF gave a block table (its decode fast path): stock cannot serve this step
    seq_lens: torch.Tensor           # [B] int32
    query_start_loc: torch.Tensor    # [B + 1] int32
    block_table: torch.Tensor        # [B, max_blocks] int32 block ids
    slot_mapping: Optional[torch.Tensor]  # [T] int64, None: the op's default (from the table, decode path)
    positions: torch.Tensor          # [T] int64: row t of the step's cos/sin
    output_attentions: bool = False  # the step returns attention weights
    layer_calls: list = field(default_factory=list)  # per layer: the op its attention called, or None


def is_continuous_batching_cache(cache) -> bool:
    return isinstance(cache, PagedAttentionCache)


def _full_attention_allocator(cache):
    """The cache's one allocator, if it is HF's full-attention one (sliding windows stay stock)."""
    allocators = list(cache.cache_allocators.values())
    if len(allocators) != 1 or type(allocators[0]) is not FullAttentionCacheAllocator:
        return None
    return allocators[0]


def _pages_per_block(allocator) -> int:
    """Pages from one block to the next in a layer's page view: every layer's K and V page."""
    return allocator.block_physical_stride // allocator.tokens_per_page


def layer_pages(allocator, layer_idx: int) -> tuple:
    """(k_cache, v_cache) of one layer: ``[num_blocks, page_size, Hkv, D]`` views of HF's buffer (no copy), block
    i at block i's page of that layer. Built once per allocator."""
    views = _PAGES.setdefault(allocator, {})
    if layer_idx not in views:
        k_pages, v_pages = allocator._kv_page_views[layer_idx]
        step = _pages_per_block(allocator)
        views[layer_idx] = (k_pages[::step], v_pages[::step])
    return views[layer_idx]


def _first_token_of_each_page(index: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, max_blocks: int,
                              page_size: int) -> torch.Tensor:
    """[B, max_blocks]: index[starts[b] + j * page_size] (clamped to the row's last entry: past its blocks, the
    table holds a block the op never reads)."""
    columns = torch.arange(max_blocks, dtype=torch.long) * page_size
    positions = torch.minimum(starts.long()[:, None] + columns[None], ends.long()[:, None] - 1)
    return index[positions]


def plan_batch_step(cache, kwargs: dict, num_tokens: int, output_attentions: bool = False) -> Optional[BatchStep]:
    """The op's arguments for this step, or None when the fused ops cannot serve it (another allocator than one
    full-attention group, padded inputs): those steps run HF's stock attention."""
    allocator = _full_attention_allocator(cache)
    cu_q = kwargs.get("cu_seq_lens_q")
    cu_k = kwargs.get("cu_seq_lens_k")
    if allocator is None or cu_q is None or cu_k is None:
        return None
    if isinstance(cu_k, dict):
        cu_k = cu_k.get(allocator.layer_type)
    query_start_loc, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
    seq_lens = cu_k.diff()
    query_lens = query_start_loc.diff()
    if int(query_start_loc[-1]) != num_tokens or seq_lens.numel() == 0 or bool((query_lens < 1).any()):
        return None   # padded for a graph or compile: rows without tokens
    page_size = allocator.tokens_per_page
    positions = torch.arange(num_tokens)
    block_table = kwargs.get("block_table")
    if block_table is not None:
        table = (block_table[allocator.index].clamp(min=0) // _pages_per_block(allocator)).to(torch.int32)
        return BatchStep(cache, allocator, True, True, seq_lens, query_start_loc, table, None, positions,
                         output_attentions, [None] * len(cache.layer_to_allocator))
    write = kwargs["write_index"][allocator.index]
    read = kwargs["read_index"][allocator.index]
    if write.numel() != num_tokens:
        return None
    stride = allocator.block_physical_stride
    slots = torch.where(write == allocator.write_trash_index, -1, write // stride * page_size + write % stride)
    max_blocks = -(-int(seq_lens.max()) // page_size)
    if read.numel():
        first = _first_token_of_each_page(read, cu_k[:-1], cu_k[1:], max_blocks, page_size)
    elif torch.equal(seq_lens, query_lens):   # new prompts only: what is written is all there is to read
        first = _first_token_of_each_page(write, query_start_loc[:-1], query_start_loc[1:], max_blocks, page_size)
    else:
        return None
    table = (first // stride).to(torch.int32)
    return BatchStep(cache, allocator, num_tokens == seq_lens.numel(), False, seq_lens, query_start_loc, table,
                     slots, positions, output_attentions, [None] * len(cache.layer_to_allocator))


def fused_batch_attention(module, hidden_states: torch.Tensor, position_embeddings: tuple,
                          step: BatchStep) -> tuple:
    """One layer of a continuous-batching step: the projections, one ``fa_fused`` (all decode) or
    ``fa_fused_varlen`` call on HF's pages, and ``o_proj``. Returns stock's (output, no weights)."""
    shape = hidden_states.shape[:-1]
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    head_dim = module.head_dim
    query, key, value = project_qkv(module, flat)
    k_cache, v_cache = layer_pages(step.allocator, module.layer_idx)
    cos, sin = (table.reshape(-1, head_dim) for table in position_embeddings)
    common = dict(positions=step.positions, slot_mapping=step.slot_mapping, eps=module.q_norm.variance_epsilon,
                  scale=module.scaling)
    if step.decode:
        out = torch.ops.qwen.fa_fused(query, key, value, module.q_norm.weight, module.k_norm.weight, cos, sin,
                                      k_cache, v_cache, step.block_table, step.seq_lens, **common)
    else:
        out = torch.ops.qwen.fa_fused_varlen(query, key, value, module.q_norm.weight, module.k_norm.weight, cos, sin,
                                             k_cache, v_cache, step.block_table, step.seq_lens, step.query_start_loc,
                                             **common)
    return module.o_proj(out.reshape(*shape, -1)), None


def enable_block_table_decode(manager, requested_config, workload_hints) -> bool:
    """Turns HF's decode fast path (a block table instead of read/write indices) on for a manager that HF resolved
    without it (every device but CUDA/XPU with flash attention), sized as HF would have sized it. Left alone when the
    user asked for ``max_blocks_per_request=0`` or the manager's cache already exists (a reused manager). Returns
    whether it turned the path on (then ``disable_block_table_decode`` turns it off)."""
    config = manager.continuous_batching_config
    if config.max_blocks_per_request or manager.batch_processor is not None:
        return False
    if requested_config is not None and requested_config.max_blocks_per_request == 0:
        return False
    wanted = copy.deepcopy(requested_config) if requested_config is not None else ContinuousBatchingConfig()
    resolve_using_hints(wanted, workload_hints)
    resolve_without_hints(wanted)
    config.max_blocks_per_request = wanted.max_blocks_per_request
    return bool(config.max_blocks_per_request)


def disable_block_table_decode(manager) -> None:
    """Gives a manager that ``enable_block_table_decode`` turned on HF's setting back (the path off), for stock
    attention, which can serve neither the block table nor a cache sized for it: its config, and a new batch
    processor (cache, inputs) at its next start, as HF builds for a manager that is not kept. The manager must not be
    running (its generation thread holds its batch processor)."""
    manager.continuous_batching_config.max_blocks_per_request = 0
    manager.batch_processor = None
    manager.warmed_up = False
