"""A paged KV cache behind the Hugging Face transformers ``Cache`` API (transformers 5.x).

Per layer, ``k_cache``/``v_cache`` are the block pools ``[num_blocks, block_size, num_kv_heads, head_dim]``
(vLLM's "NHD" layout, what ``torch.ops.qwen.fa_fused`` reads and writes). All layers share one block
allocator (a free list), one block table ``[batch, max_blocks]`` int32 and one ``seq_lens`` ``[batch]``
int32: every layer sees the same tokens, as in vLLM.

Hugging Face pads batches (on the left for generation; right or mid padding in user masks), and padding is
never stored, so three things are kept:

* ``get_seq_length()``: the positions seen per row by the model, padding included (what ``generate()``, the
  masks and ``position_ids`` count with, exactly as ``DynamicCache`` reports it);
* ``stored_positions`` ``[batch, seen]`` bool: which of those positions hold a token in the pools (the mask's
  real tokens), so that ``crop`` drops exactly the tokens of the cropped positions;
* ``seq_lens[b]``: the tokens row b holds, ``stored_positions[b].sum()``.

``layers[i].keys`` / ``.values`` are what HF code expects of a cache layer, ``[batch, num_kv_heads, seen,
head_dim]``, gathered from the pools on demand (zeros at positions that hold no token).

A forward step is bracketed by ``begin_forward`` (``step.plan_step`` plans it once for all layers: which new
tokens are real, their RoPE positions, their cache slots; it allocates the blocks, or raises
``OutOfBlocksError`` before anything is touched; the cache holds the plan) and ``end_forward`` (commits the
lengths). ``torch_qwen_fused.hf.patch_model``
installs both as hooks on the model; a step that fails in between is rolled back at the next
``begin_forward``.
"""

import copy
import weakref
from typing import Callable, Optional, Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import pools
from .blocks import BlockAllocator, BlockTable, OutOfBlocksError
from .step import StepPlan, plan_step
from .tensor_parallel import local_kv_heads

__all__ = ["PagedKVCache", "PagedLayer"]

class PagedLayer(CacheLayerMixin):
    """One layer of a ``PagedKVCache``: its block pools and HF's view of them.

    ``k_cache`` / ``v_cache``: the pools, ``[num_blocks, block_size, num_kv_heads, head_dim]`` (None before the
    first step), what ``fa_fused`` reads and writes. ``keys`` / ``values``: ``[batch, num_kv_heads, seen,
    head_dim]`` as in a ``DynamicLayer``, gathered from the pools on each read (a copy: writing to it changes
    nothing), zeros at the positions that hold no token (padding, freed rows); the committed steps only.
    Lengths, block tables and the allocator live in the cache.
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False
    supports_early_init = False

    def __init__(self, cache: "PagedKVCache", layer_idx: int):
        # Not CacheLayerMixin.__init__: it assigns ``keys``/``values``, which here are views computed on read.
        self._cache = weakref.ref(cache)
        self.layer_idx = layer_idx
        self.k_cache: Optional[torch.Tensor] = None
        self.v_cache: Optional[torch.Tensor] = None
        # fp8 pools: the layer's scales ([1] fp32; stored = x / scale), given or calibrated at its first write.
        self.k_scale: Optional[torch.Tensor] = None
        self.v_scale: Optional[torch.Tensor] = None
        self.is_initialized = False

    def __deepcopy__(self, memo):
        # The weak reference to the cache would survive a deepcopy as is, pointing at the original cache.
        copied = PagedLayer.__new__(PagedLayer)
        memo[id(self)] = copied
        for name, value in self.__dict__.items():
            if name != "_cache":
                copied.__dict__[name] = copy.deepcopy(value, memo)
        copied._cache = weakref.ref(copy.deepcopy(self._cache(), memo))
        return copied

    @property
    def keys(self) -> Optional[torch.Tensor]:
        return None if self.k_cache is None else self._cache().seen_states(self.k_cache, self.k_scale)

    @property
    def values(self) -> Optional[torch.Tensor]:
        return None if self.v_cache is None else self._cache().seen_states(self.v_cache, self.v_scale)

    def __repr__(self):
        shape = None if self.k_cache is None else list(self.k_cache.shape)
        return f"PagedLayer(layer_idx={self.layer_idx}, k_cache={shape})"

    def lazy_initialization(self, key_states, value_states) -> None:
        """The pool is allocated by ``PagedKVCache.begin_forward``, for all layers at once."""

    def update(self, key_states, value_states, *args, **kwargs):
        return self._cache().update(key_states, value_states, self.layer_idx)

    def get_mask_sizes(self, query_length: int) -> tuple:
        return self._cache().get_mask_sizes(query_length, self.layer_idx)

    def get_seq_length(self) -> int:
        return self._cache().get_seq_length(self.layer_idx)

    def get_max_length(self) -> int:
        return -1

    def _whole_cache_only(self, name):
        raise NotImplementedError(f"PagedLayer.{name}: the layers of a PagedKVCache share their block tables; "
                                  f"call PagedKVCache.{name} instead")

    def reset(self):
        self._whole_cache_only("reset")

    def crop(self, tokens_to_remove):
        self._whole_cache_only("crop")

    def reorder_cache(self, beam_idx):
        self._whole_cache_only("reorder_cache")

    def batch_repeat_interleave(self, repeats):
        self._whole_cache_only("batch_repeat_interleave")

    def batch_select_indices(self, indices):
        self._whole_cache_only("batch_select_indices")


class PagedKVCache(Cache):
    """Paged KV cache for Qwen3 decoding through ``torch.ops.qwen.fa_fused``, usable as a transformers ``Cache``.

    Per layer it owns ``layers[i].k_cache`` / ``layers[i].v_cache``: (num_blocks, block_size, num_kv_heads,
    head_dim), in the model's dtype. Rows get blocks from a shared free list as they grow; ``block_table``
    (batch, max_blocks) int32 maps each row's logical blocks to physical ones and ``seq_lens`` (batch,) int32
    counts the real (non-padding) tokens of each row. Give it to ``generate(..., cache=...)`` (or the
    deprecated ``past_key_values=``) of a model patched by ``torch_qwen_fused.hf.patch_model``; a patched
    model's plain ``generate()`` builds one itself.

    Arguments:
        config [optional]: the model config (``num_hidden_layers``, ``num_key_value_heads``, ``head_dim``
            are read from it); or give ``num_layers``, ``num_kv_heads``, ``head_dim``. The config of a model
            loaded under HF tensor parallelism (``DistributedConfig``) gives this rank's share of the kv heads.
        block_size: tokens per block, >= 1. Default 128.
        num_blocks [optional]: fixed size of the pool. A step that needs more raises ``OutOfBlocksError``
            before anything is written.
        max_memory [optional]: bytes for the K and V pools of all layers together; fixes
            ``num_blocks = max_memory // bytes_per_block``. Give ``num_blocks`` or ``max_memory``, not both.
            With neither, the pool is sized at the first step.
        growable [optional]: whether a full pool grows (reallocated, at least doubling) instead of raising
            ``OutOfBlocksError``. Default: only when neither ``num_blocks`` nor ``max_memory`` is given;
            ``num_blocks=N, growable=True`` starts with N blocks.
        cache_dtype, device [optional]: of the pools; default the dtype and device passed by the first
            ``begin_forward`` (the patched model passes its own). ``torch.float8_e4m3fn`` / ``float8_e5m2``: an fp8
            cache (half bf16's bytes): each layer stores K and V divided by its scales, saturated to the fp8
            range (``fa_fused``'s ``k_scale`` / ``v_scale``).
        k_scales, v_scales [optional]: fp8 caches' per-layer scales (a float per layer). Default: calibrated
            from each layer's first write (a prefill): its absolute maximum over the fp8 range's maximum.
    """

    is_compileable = False

    def __init__(self, config=None, *, block_size: int = 128, num_blocks: Optional[int] = None,
                 max_memory: Optional[int] = None, num_layers: Optional[int] = None,
                 num_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 cache_dtype: Optional[torch.dtype] = None, device=None, growable: Optional[bool] = None,
                 k_scales: Optional[Sequence[float]] = None, v_scales: Optional[Sequence[float]] = None):
        if config is not None:
            text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            num_layers = num_layers or text.num_hidden_layers
            num_kv_heads = num_kv_heads or local_kv_heads(config, text.num_key_value_heads)
            head_dim = head_dim or getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PagedKVCache: {name} must be a positive int (or come from config), got {value!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"PagedKVCache: block_size must be an int >= 1, got {block_size!r}")
        if num_blocks is not None and max_memory is not None:
            raise ValueError("PagedKVCache: give num_blocks or max_memory, not both")
        if num_blocks is not None and (not isinstance(num_blocks, int) or num_blocks < 1):
            raise ValueError(f"PagedKVCache: num_blocks must be an int >= 1, got {num_blocks!r}")
        if max_memory is not None and max_memory <= 0:
            raise ValueError(f"PagedKVCache: max_memory must be a positive number of bytes, got {max_memory!r}")
        if growable and max_memory is not None:
            raise ValueError("PagedKVCache: max_memory is a fixed budget; it cannot be growable")
        for name, scales in (("k_scales", k_scales), ("v_scales", v_scales)):
            if scales is not None and (cache_dtype not in pools.FP8_DTYPES or len(scales) != num_layers
                                       or not all(0 < float(s) < float("inf") for s in scales)):
                raise ValueError(f"PagedKVCache: {name} must be {num_layers} finite positive floats (one per layer), "
                                 f"for an fp8 cache_dtype; got {scales!r} with cache_dtype={cache_dtype}")
        super().__init__(layers=[PagedLayer(self, i) for i in range(num_layers)])
        for index, layer in enumerate(self.layers):
            if k_scales is not None:
                layer.k_scale = torch.tensor([float(k_scales[index])])
            if v_scales is not None:
                layer.v_scale = torch.tensor([float(v_scales[index])])
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self._requested_blocks = num_blocks
        self._max_memory = max_memory
        self._growable = growable if growable is not None else num_blocks is None and max_memory is None
        self._dtype = cache_dtype
        self._model_dtype: Optional[torch.dtype] = None   # what gathered (dequantized) states are returned in
        self._device = torch.device(device) if device is not None else None
        self._allocator: Optional[BlockAllocator] = None
        self._table = BlockTable(block_size)
        self._seq_lens = torch.zeros(0, dtype=torch.int32)
        self._stored = torch.zeros(0, 0, dtype=torch.bool)
        self._plan: Optional[StepPlan] = None

    # ------------------------------------------------------------------ introspection
    def __repr__(self):
        return (f"PagedKVCache(layers={len(self.layers)}, block_size={self.block_size}, num_blocks={self.num_blocks}, "
                f"free_blocks={self.num_free_blocks}, rows={len(self._table)}, "
                f"seq_lens={self._seq_lens.tolist()}, seen_tokens={self.get_seq_length()})")

    @property
    def num_blocks(self) -> Optional[int]:
        """Blocks in the pool (None before the pool is allocated)."""
        return self._allocator.num_blocks if self._allocator is not None else self._requested_blocks

    @property
    def num_free_blocks(self) -> Optional[int]:
        return self._allocator.num_free if self._allocator is not None else None

    @property
    def growable(self) -> bool:
        return self._growable

    @property
    def block_table(self) -> torch.Tensor:
        """(batch, max_blocks) int32; columns past a row's blocks hold 0 and are never read."""
        return self._table.tensor

    @property
    def seq_lens(self) -> torch.Tensor:
        """(batch,) int32: real (non-padding) tokens held per row. Do not modify in place."""
        return self._seq_lens

    @property
    def stored_positions(self) -> torch.Tensor:
        """(batch, seen) bool: which positions seen by the model hold a token in the pools (False: padding, or a
        freed row's old positions); the 2-D ``attention_mask`` of the next step must agree. Do not modify."""
        return self._stored

    @property
    def row_blocks(self) -> list:
        """Physical blocks of each row, in logical order (a copy)."""
        return [list(blocks) for blocks in self._table.rows]

    @property
    def batch_size(self) -> int:
        return len(self._table) if len(self._table) else -1

    @property
    def is_initialized(self) -> bool:
        return self._allocator is not None

    @property
    def current_plan(self) -> Optional[StepPlan]:
        """The step between ``begin_forward`` and ``end_forward``, if any."""
        return self._plan

    def bytes_per_block(self, dtype: Optional[torch.dtype] = None) -> int:
        """Bytes one block takes in the K and V pools of all layers."""
        dtype = dtype or self._dtype or torch.float32
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * len(self.layers) * self.block_size * self.num_kv_heads * self.head_dim * itemsize

    def seen_states(self, pool: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(batch, num_kv_heads, seen, head_dim): ``pool`` (one layer's ``k_cache`` or ``v_cache``) gathered at
        the committed positions of every row, as a ``DynamicCache`` layer holds them; zeros where no token is
        stored. An fp8 pool is dequantized (times its scale) into the model's dtype."""
        dtype = (self._model_dtype or torch.float32) if pool.dtype in pools.FP8_DTYPES else pool.dtype
        return pools.gather(pool, *self._seen_slots(), scale, dtype)

    # ------------------------------------------------------------------ HF Cache API
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions seen per row, padding included (as ``DynamicCache``); ``seq_lens`` has the stored tokens."""
        return self._stored.shape[1]

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return -1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Writes this step's real new tokens of layer ``layer_idx`` (one vectorized write each for K and V).

        key_states, value_states: (batch, num_kv_heads, query_length, head_dim), K already normed and roped.
        Returns what a ``DynamicCache`` returns, (batch, num_kv_heads, seen + query_length, head_dim): the
        seen positions from the cache (zeros where no token is stored: HF's mask hides them), then the inputs
        themselves, so that the model's own mask applies as is. The cache keeps detached copies: gradients
        flow through this step's keys and values, not into earlier steps'.
        """
        plan = self.require_plan("update")
        batch, heads, length, head_dim = key_states.shape
        expected = (len(self._table), self.num_kv_heads, plan.query_length, self.head_dim)
        if (batch, heads, length, head_dim) != expected:
            raise ValueError(f"PagedKVCache.update: key_states must have shape {list(expected)} "
                             f"[batch, num_kv_heads, query_length, head_dim], got {list(key_states.shape)}")
        layer = self.layers[layer_idx]
        key_states, value_states = pools.write(layer, key_states, value_states, plan.real_slots, plan.real_index)
        if not plan.has_past:
            # DynamicCache's layout, not the projections' transposed view: SDPA's CPU kernel reads that 10-15%
            # slower on long prompts (batch 4 x 8192 tokens), and stock's cache hands it contiguous states.
            return key_states.contiguous(), value_states.contiguous()
        if plan.seen_slots is None:
            plan.seen_slots = self._seen_slots()
        past_keys = pools.gather(layer.k_cache, *plan.seen_slots, layer.k_scale, key_states.dtype)
        past_values = pools.gather(layer.v_cache, *plan.seen_slots, layer.v_scale, value_states.dtype)
        return torch.cat((past_keys, key_states), dim=2), torch.cat((past_values, value_states), dim=2)

    def reset(self) -> None:
        """Frees every row (the pools are kept)."""
        self._plan = None
        if self._allocator is not None:
            self._allocator = BlockAllocator(self._allocator.num_blocks)
        self._table.reset(0)
        self._seq_lens = torch.zeros(0, dtype=torch.int32, device=self._seq_lens.device)
        self._stored = torch.zeros(0, 0, dtype=torch.bool, device=self._stored.device)

    def crop(self, tokens_to_remove: int) -> None:
        """Drops the last ``-tokens_to_remove`` seen positions of every row (a negative count, as
        ``DynamicCache``), and with them exactly the tokens stored at those positions (none for padding)."""
        if tokens_to_remove > 0:
            raise ValueError(f"PagedKVCache.crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        self._rollback()
        seen = self.get_seq_length()
        keep = max(seen + tokens_to_remove, 0)
        if keep == seen:
            return
        self._stored = self._stored[:, :keep]
        self._seq_lens = self._stored.sum(dim=1, dtype=torch.int32)
        self._table.truncate(self._seq_lens.tolist(), self._allocator)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._gather_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._gather_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._gather_rows(torch.arange(len(self._table)).repeat_interleave(repeats))

    # ------------------------------------------------------------------ rows
    def free_rows(self, rows: Sequence[int]) -> None:
        """For a serving loop outside ``generate()``: returns the blocks of ``rows`` to the free list, for a new
        sequence (or other rows) to use. The other rows are untouched.

        A freed row holds no token (``seq_lens`` 0), but ``get_seq_length()`` counts positions for the whole
        batch, as in HF, so the row's old positions stay seen, as padding (``stored_positions`` False): the
        row's next step must give them ``attention_mask`` 0, exactly like a left-padded row, with
        ``position_ids`` counting its real tokens only (``attention_mask.cumsum(-1) - 1``, as ``generate()``
        computes them).
        """
        self._rollback()
        rows = [int(row) for row in rows]
        for row in rows:
            if not 0 <= row < len(self._table):
                raise IndexError(f"PagedKVCache.free_rows: row {row} is outside [0, {len(self._table)})")
        stored = self._stored.clone()
        stored[rows] = False
        self._stored = stored
        self._seq_lens = stored.sum(dim=1, dtype=torch.int32)
        self._table.truncate(self._seq_lens.tolist(), self._allocator)

    def open_rows(self, batch_size: int, device) -> None:
        """For a step of ``batch_size`` rows: an empty cache takes that many rows; a filled one must hold them."""
        if self.get_seq_length() == 0 and not any(self._table.rows):
            self._table.reset(batch_size)
            self._seq_lens = torch.zeros(batch_size, dtype=torch.int32, device=device)
            self._stored = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
        elif batch_size != len(self._table):
            raise ValueError(f"PagedKVCache: this step has batch size {batch_size} but the cache holds "
                             f"{len(self._table)} rows (use batch_select_indices / reset to change it)")

    def reserve_blocks(self, lengths: Sequence[int], dtype, device, what: Callable[[], str]) -> list:
        """Gives each row the blocks ``lengths[row]`` tokens need (allocating the pools at the first step, growing
        a growable one); returns [(row, block)] added, or raises ``OutOfBlocksError`` (saying ``what()`` needed
        them) with nothing changed."""
        missing = self._table.missing_blocks(lengths)
        need = sum(missing)
        if self._allocator is None:
            self._allocate_pool(need + len(self._table), dtype, device)
        if need > self._allocator.num_free:
            self._make_room(need - self._allocator.num_free, what())
        return self._table.grow(missing, self._allocator)

    def slots(self, logical: torch.Tensor) -> torch.Tensor:
        """Flat pool slot of each row's logical token indices [rows, n] (each within the row's blocks)."""
        return self._table.slots(logical)

    def _gather_rows(self, index: torch.Tensor) -> None:
        """New row i = old row index[i]. A row taken once keeps its blocks; a repeated one gets copies."""
        self._rollback()
        if not len(self._table):
            return
        index = [int(i) for i in torch.as_tensor(index).reshape(-1).tolist()]
        old_rows = len(self._table)
        if any(not 0 <= i < old_rows for i in index):
            raise IndexError(f"PagedKVCache: row indices {index} must be in [0, {old_rows})")
        need, freed = self._table.copies_needed(index)
        if need > self._allocator.num_free + freed:
            self._make_room(need - self._allocator.num_free - freed, "copying repeated rows")
        sources, targets = self._table.select(index, self._allocator)
        if targets:
            pools.copy_blocks(self.layers, sources, targets)
        rows = torch.tensor(index, dtype=torch.long, device=self._seq_lens.device)
        self._seq_lens = self._seq_lens[rows]
        self._stored = self._stored[rows]

    # ------------------------------------------------------------------ one forward step (planned in step.py)
    def begin_forward(self, batch_size: int, query_length: int, attention_mask: Optional[torch.Tensor] = None,
                      position_ids: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None,
                      device=None, output_attentions: bool = False) -> StepPlan:
        """Plans a forward step of ``query_length`` new tokens per row, for all layers: ``step.plan_step`` (what
        ``attention_mask`` and ``position_ids`` say; the blocks it allocates, or ``OutOfBlocksError`` with nothing
        changed). dtype, device: of the pools if they are not allocated yet (the constructor's take precedence).
        output_attentions: the step returns attention weights (its layers run the stock attention).
        The plan is ``current_plan`` until ``end_forward``; a step that never commits is undone at the next
        ``begin_forward`` (or ``crop``, ``reset``, a row change)."""
        self._rollback()
        if dtype is not None:
            self._model_dtype = dtype
        device = torch.device(device) if device is not None else (self._device or torch.device("cpu"))
        if self._allocator is not None:
            device = self.layers[0].k_cache.device
        self._plan = plan_step(self, batch_size, query_length, attention_mask, position_ids, dtype, device,
                               output_attentions)
        return self._plan

    def end_forward(self) -> None:
        """Commits the planned step: its tokens now count in ``seq_lens`` and ``get_seq_length()``."""
        plan = self.require_plan("end_forward")
        self._seq_lens = plan.seq_lens
        self._stored = torch.cat((self._stored, plan.real), dim=1)
        self._plan = None

    # ------------------------------------------------------------------ internals
    def require_plan(self, caller: str) -> StepPlan:
        if self._plan is None:
            raise RuntimeError(
                f"PagedKVCache.{caller}: no forward step is in progress. A PagedKVCache is filled by a model "
                "patched with torch_qwen_fused.hf.patch_model(model) (its hooks call begin_forward/end_forward); "
                "a stock model cannot write to it.")
        return self._plan

    def _rollback(self) -> None:
        """Undoes the allocations of a step that began but never committed (its forward raised)."""
        plan, self._plan = self._plan, None
        if plan is None or not plan.new_blocks:
            return
        self._table.undo(plan.new_blocks, self._allocator)

    def _seen_slots(self):
        """(slots, stored), both (batch, seen): the flat pool slot of each seen position (0 where none is
        stored) and whether one is."""
        stored = self._stored
        ordinal = (stored.cumsum(dim=1) - 1).clamp_(min=0)            # the row's j-th stored token: logical slot j
        return torch.where(stored, self._table.slots(ordinal), 0), stored

    def _allocate_pool(self, initial_blocks: int, dtype, device) -> None:
        dtype = self._dtype or dtype or torch.float32
        device = self._device or device
        if self._requested_blocks is not None:
            num_blocks = self._requested_blocks
        elif self._max_memory is not None:
            num_blocks = int(self._max_memory // self.bytes_per_block(dtype))
            if num_blocks < 1:
                raise ValueError(f"PagedKVCache: max_memory={self._max_memory} bytes is less than one block "
                                 f"({self.bytes_per_block(dtype)} bytes for all layers' K and V)")
        else:
            num_blocks = max(initial_blocks, 1)
        pools.allocate(self.layers, (num_blocks, self.block_size, self.num_kv_heads, self.head_dim), dtype, device)
        self._dtype = dtype
        self._allocator = BlockAllocator(num_blocks)
        self._table.to(device)
        self._seq_lens = self._seq_lens.to(device)
        self._stored = self._stored.to(device)

    def _make_room(self, missing: int, what: str) -> None:
        """Grows a growable pool by at least ``missing`` blocks, else raises ``OutOfBlocksError``."""
        allocator = self._allocator
        if not self.growable:
            raise OutOfBlocksError(
                f"PagedKVCache out of blocks: {what} needs {missing} more block(s) of {self.block_size} tokens "
                f"than the {allocator.num_free} free of {allocator.num_blocks}. Nothing was written. Free rows "
                "(free_rows / batch_select_indices) or build the cache with more num_blocks or max_memory.")
        new_total = max(2 * allocator.num_blocks, allocator.num_blocks + missing)
        pools.grow(self.layers, new_total)
        allocator.grow(new_total)
