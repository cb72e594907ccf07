"""The decode step of a patched Qwen3 attention layer: when one ``fa_fused`` call can serve it, and that call."""

import torch
from transformers.utils.output_capturing import _active_collector

from .step import StepPlan

__all__ = ["can_fuse", "fused_decode"]


def attentions_requested(kwargs) -> bool:
    """Whether this forward must return attention weights: the ``output_attentions`` kwarg, or the output
    collector that transformers' ``capture_outputs`` set up for this forward (from that kwarg or
    ``config.output_attentions``). The collector is transformers 5.x's private context variable: there is no
    public way to ask it."""
    if kwargs.get("output_attentions"):
        return True
    collector = _active_collector.get()
    return collector is not None and "attentions" in collector


def can_fuse(module, hidden_states: torch.Tensor, plan: StepPlan, kwargs) -> bool:
    """Whether this step is one ``fa_fused`` call: one new real token per row, a mask that sees exactly the
    cached tokens, and nothing the op does not give (attention weights, dropout, gradients)."""
    if plan.query_length != 1 or not plan.all_real or not plan.mask_matches_cache:
        return False
    if attentions_requested(kwargs) or (module.training and module.attention_dropout > 0):
        return False
    # fa_fused is inference-only: it raises under grad mode when an input requires grad.
    return not (torch.is_grad_enabled()
                and (hidden_states.requires_grad or any(p.requires_grad for p in module.parameters())))


def fused_decode(module, hidden_states: torch.Tensor, cache, plan: StepPlan, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple:
    """Qwen3 attention of one new token per row: the projections, one ``fa_fused`` call (qk-norm, RoPE at HF's
    position ids, the cache write, paged attention) and ``o_proj``. Returns stock's (output, no weights)."""
    batch = hidden_states.shape[0]
    head_dim = module.head_dim
    query = module.q_proj(hidden_states).view(batch, -1, head_dim)
    key = module.k_proj(hidden_states).view(batch, -1, head_dim)
    value = module.v_proj(hidden_states).view(batch, -1, head_dim)
    layer = cache.layers[module.layer_idx]
    out = torch.ops.qwen.fa_fused(
        query, key, value, module.q_norm.weight, module.k_norm.weight, cos, sin,
        layer.k_cache, layer.v_cache, cache.block_table, plan.seq_lens,
        positions=plan.decode_positions, slot_mapping=plan.decode_slots,
        eps=module.q_norm.variance_epsilon, scale=module.scaling)
    return module.o_proj(out.reshape(batch, 1, -1)), None
