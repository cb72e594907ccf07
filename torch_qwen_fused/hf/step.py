"""One forward step through a ``PagedKVCache``: what it writes and whether the fused decode can serve it.

``plan_step`` builds the ``StepPlan`` once for all layers from HF's mask and position ids, taking the blocks it
needs from the cache's rows; ``PagedKVCache.begin_forward`` calls it and holds the plan until ``end_forward``.
"""

from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["StepPlan", "plan_step", "real_new_tokens", "mask_sees_exactly"]


@dataclass
class StepPlan:
    """What one forward step writes, computed once for all layers by ``plan_step``."""

    query_length: int
    seen: int                    # positions seen per row before this step (padding included)
    has_past: bool               # seen > 0: attention reads the seen positions from the cache (a compiled step guards
                                 # on this flag, not on the count, which grows at every step)
    real: torch.Tensor           # [B, q] bool: which new tokens are real (not padding)
    all_real: bool
    positions: torch.Tensor      # [B, q] int64: HF position ids (RoPE positions) of the new tokens
    past_lens: torch.Tensor      # [B] int64: real tokens cached before this step
    seq_lens: torch.Tensor       # [B] int32: real tokens cached after this step
    slots: torch.Tensor          # [B, q] int64: flat cache slot of each new token, -1 for padding
    real_index: Optional[torch.Tensor]  # [N] int64: flat (b * q + t) index of the real new tokens, None if all
    real_slots: torch.Tensor     # [N] int64: their slots
    mask_matches_cache: bool     # the step's mask lets each row see exactly its cached tokens (and itself)
    new_blocks: list             # [(row, block)] allocated by this step, undone if the step never commits
    seen_slots: Optional[tuple] = None  # (slots [B, seen], stored [B, seen]) of the past, built on demand
    output_attentions: bool = False     # the step returns attention weights: every layer runs stock attention
    layer_calls: list = field(default_factory=list)  # per layer: the op its attention called ("fa_fused", ...) or None
    ahead: bool = False  # planned and committed around a compiled forward (PatchHandle.wrap_compiled), not by its hooks

    @property
    def decode_positions(self) -> torch.Tensor:
        return self.positions[:, 0]

    @property
    def decode_slots(self) -> torch.Tensor:
        return self.slots[:, 0]

    @property
    def real_positions(self) -> torch.Tensor:
        """[N] int64: the RoPE positions of the real new tokens, packed row after row."""
        flat = self.positions.reshape(-1)
        return flat if self.real_index is None else flat.index_select(0, self.real_index)

    @property
    def query_start_loc(self) -> torch.Tensor:
        """[B + 1] int32: where each row's real new tokens start among the packed ones (fa_fused_varlen's)."""
        counts = self.real.sum(dim=1, dtype=torch.int32)
        return torch.cat((counts.new_zeros(1), counts.cumsum(0, dtype=torch.int32)))


def plan_step(cache, batch_size: int, query_length: int, attention_mask: Optional[torch.Tensor],
              position_ids: Optional[torch.Tensor], dtype: Optional[torch.dtype], device,
              output_attentions: bool = False) -> StepPlan:
    """Plans a forward step of ``query_length`` new tokens per row of ``cache`` (a ``PagedKVCache``), for all layers.

    attention_mask [optional]: the 2-D HF mask (batch, seen + query_length) (or (batch, query_length)); its last
        ``query_length`` columns say which new tokens are real, and its first ``seen`` ones must not mark real a
        position that holds no token (padding, a freed row). A 4-D mask is read on its diagonal. None: all new
        tokens are real, and so must be all seen positions.
    position_ids [optional]: (batch or 1, query_length), the new tokens' RoPE positions; default
        ``get_seq_length() + arange(query_length)``, as HF does.
    dtype, device: of the pools if the cache has not allocated them yet; ``device`` also of the plan's tensors.
    output_attentions: whether the step must return attention weights (then no layer calls the ops).

    Gives the rows the blocks their real new tokens need (all rows at once) or raises ``OutOfBlocksError`` with
    nothing changed; the plan's ``new_blocks`` lists them, for the cache to undo a step that never commits.
    """
    seen = cache.get_seq_length()
    real = real_new_tokens(attention_mask, batch_size, query_length, device)
    if position_ids is None:
        positions = (torch.arange(query_length, device=device) + seen).unsqueeze(0).expand(batch_size, -1)
    elif position_ids.dim() != 2 or position_ids.shape[-1] != query_length:
        raise ValueError(f"PagedKVCache: position_ids must have shape [batch, {query_length}], "
                         f"got {list(position_ids.shape)}")
    else:
        # Contiguous: HF's position ids are often a column slice, whose stride would change at every step (and
        # with it the guards of a compiled layer).
        positions = position_ids.to(device=device, dtype=torch.long).expand(batch_size, -1).contiguous()
    cache.open_rows(batch_size, device)
    mask_matches_cache = mask_sees_exactly(attention_mask, cache.stored_positions, query_length)

    past = cache.seq_lens.to(device=device, dtype=torch.long)
    totals = past + real.sum(dim=1)
    new_blocks = cache.reserve_blocks(totals.tolist(), dtype, device, lambda: (
        f"a step of {query_length} token(s) per row (rows now hold {past.tolist()} tokens, "
        f"{(totals - past).tolist()} new)"))
    index = past.unsqueeze(1) + real.cumsum(dim=1) - 1                      # logical index per token
    slots = torch.where(real, cache.slots(index.clamp(min=0)), -1)
    all_real = bool(real.all())
    real_index = None if all_real else real.reshape(-1).nonzero().squeeze(1)
    real_slots = slots.reshape(-1) if all_real else slots.reshape(-1).index_select(0, real_index)
    return StepPlan(query_length=query_length, seen=seen, has_past=seen > 0, real=real, all_real=all_real,
                    positions=positions, past_lens=past, seq_lens=totals.to(torch.int32), slots=slots,
                    real_index=real_index, real_slots=real_slots, mask_matches_cache=mask_matches_cache,
                    new_blocks=new_blocks, output_attentions=output_attentions, layer_calls=[None] * len(cache.layers))


def real_new_tokens(attention_mask, batch_size: int, query_length: int, device) -> torch.Tensor:
    """[B, q] bool: which of a step's new tokens are real, from HF's 2-D mask (its last q columns) or a 4-D
    one (its diagonal); all of them without a mask."""
    if attention_mask is None:
        return torch.ones(batch_size, query_length, dtype=torch.bool, device=device)
    mask = attention_mask.to(device)
    if mask.dim() == 2 and mask.shape[0] == batch_size and mask.shape[1] >= query_length:
        return mask[:, -query_length:].bool()
    if mask.dim() == 4 and mask.shape[0] == batch_size and mask.shape[2] == query_length:
        offset = mask.shape[3] - query_length
        diagonal = mask[:, 0].diagonal(offset=offset, dim1=-2, dim2=-1)
        return diagonal if mask.dtype == torch.bool else diagonal == 0
    raise ValueError(f"PagedKVCache: attention_mask must be [batch, seen + {query_length}] (2-D) or "
                     f"[batch, 1, {query_length}, kv] (4-D), got {list(attention_mask.shape)}")


def mask_sees_exactly(attention_mask, stored: torch.Tensor, query_length: int) -> bool:
    """Whether the step's mask lets each row see exactly its stored tokens (``stored``: [B, seen] bool); then
    the paged decode, which attends to them, computes what the mask asks. Raises if the mask marks real a
    position that holds no token."""
    seen = stored.shape[1]
    if seen == 0:
        return True
    if attention_mask is None:
        seen_real = torch.ones_like(stored)
    elif attention_mask.dim() == 2 and attention_mask.shape[1] == seen + query_length:
        seen_real = attention_mask[:, :seen].to(stored.device).bool()
    else:
        return False    # a 4-D (or shorter 2-D) mask: the stock attention applies it as it is
    missing = seen_real & ~stored
    if bool(missing.any()):
        row, position = (int(i) for i in missing.nonzero()[0])
        raise ValueError(
            f"PagedKVCache: attention_mask {'is None, which marks' if attention_mask is None else 'marks'} "
            f"position {position} of row {row} as a real token, but the cache holds no token there (it was "
            "padding, or the row was freed): pass the 2-D attention_mask of the whole sequence, with 0 where "
            "stored_positions is False")
    return bool(torch.equal(seen_real, stored))
