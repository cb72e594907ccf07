"""The decode step of a patched Qwen3 attention layer: when one ``fa_fused`` call can serve it, and that call."""

import torch

from .step import StepPlan

__all__ = ["can_fuse", "can_fuse_several", "fused_decode", "fused_several_tokens", "needs_only_what_the_ops_give",
           "project_qkv"]


def output_attentions_requested(base_model, kwargs: dict) -> bool:
    """Whether a forward of the base model (``Qwen3Model``) with these arguments returns attention weights: its
    ``output_attentions`` argument, else its config's, as transformers' ``capture_outputs`` decides. Read once per step,
    before the forward: the layers then need not ask ``capture_outputs``' collector, a context variable that
    torch.compile cannot read."""
    requested = kwargs.get("output_attentions")
    return bool(requested if requested is not None else getattr(base_model.config, "output_attentions", False))


def needs_only_what_the_ops_give(module, hidden_states: torch.Tensor, step, kwargs) -> bool:
    """Nothing the ops do not give: attention weights (the step's or this call's ``output_attentions``), dropout,
    gradients (the ops are inference-only: they raise under grad mode when an input requires grad)."""
    if step.output_attentions or kwargs.get("output_attentions") or (module.training and module.attention_dropout > 0):
        return False
    return not (torch.is_grad_enabled()
                and (hidden_states.requires_grad or any(p.requires_grad for p in module.parameters())))


def _op_can_serve(module, hidden_states: torch.Tensor, plan: StepPlan, kwargs) -> bool:
    """A mask that sees exactly the cached tokens (and causally the new ones), and nothing the ops do not give."""
    return plan.mask_matches_cache and needs_only_what_the_ops_give(module, hidden_states, plan, kwargs)


def can_fuse(module, hidden_states: torch.Tensor, plan: StepPlan, kwargs) -> bool:
    """Whether this step is one ``fa_fused`` call: one new real token per row (a decode step)."""
    return plan.query_length == 1 and plan.all_real and _op_can_serve(module, hidden_states, plan, kwargs)


def can_fuse_several(module, hidden_states: torch.Tensor, plan: StepPlan, kwargs) -> bool:
    """Whether this step is one ``fa_fused_varlen`` call: new tokens over a cache that already holds tokens
    (assisted decoding's verification of drafted tokens, a chunk of a chunked prefill, a batch with padding
    rows). A first prefill (nothing cached) stays with the model's own attention."""
    return plan.has_past and _op_can_serve(module, hidden_states, plan, kwargs)


def project_qkv(module, tokens: torch.Tensor) -> tuple:
    """(query, key, value) of ``tokens`` [N, ...hidden] as [N, heads, head_dim] each: the layer's projections,
    before qk-norm and RoPE (the ops apply those)."""
    head_dim = module.head_dim
    return tuple(projection(tokens).view(tokens.shape[0], -1, head_dim)
                 for projection in (module.q_proj, module.k_proj, module.v_proj))


def fused_decode(module, hidden_states: torch.Tensor, cache, plan: StepPlan, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple:
    """Qwen3 attention of one new token per row: the projections, one ``fa_fused`` call (qk-norm, RoPE at HF's
    position ids, the cache write, paged attention) and ``o_proj``. Returns stock's (output, no weights)."""
    batch = hidden_states.shape[0]
    query, key, value = project_qkv(module, hidden_states)
    layer = cache.layers[module.layer_idx]
    out = torch.ops.qwen.fa_fused(
        query, key, value, module.q_norm.weight, module.k_norm.weight, cos, sin,
        layer.k_cache, layer.v_cache, cache.block_table, plan.seq_lens,
        positions=plan.decode_positions, slot_mapping=plan.decode_slots,
        eps=module.q_norm.variance_epsilon, scale=module.scaling, k_scale=layer.k_scale, v_scale=layer.v_scale)
    return module.o_proj(out.reshape(batch, 1, -1)), None


def fused_several_tokens(module, hidden_states: torch.Tensor, cache, plan: StepPlan, cos: torch.Tensor,
                         sin: torch.Tensor) -> tuple:
    """Qwen3 attention of several new tokens per row in one ``fa_fused_varlen`` call. The real new tokens are
    packed row after row (each row's are the last of its cached context, as the op takes them); padding tokens
    are neither written nor attended to, and their outputs are zeros (HF discards them)."""
    batch, length = hidden_states.shape[:2]
    flat = hidden_states.reshape(batch * length, -1)
    if plan.real_index is not None:
        flat = flat.index_select(0, plan.real_index)
    query, key, value = project_qkv(module, flat)
    layer = cache.layers[module.layer_idx]
    out = torch.ops.qwen.fa_fused_varlen(
        query, key, value, module.q_norm.weight, module.k_norm.weight, cos, sin,
        layer.k_cache, layer.v_cache, cache.block_table, plan.seq_lens, plan.query_start_loc,
        positions=plan.real_positions, slot_mapping=plan.real_slots, eps=module.q_norm.variance_epsilon,
        scale=module.scaling, k_scale=layer.k_scale, v_scale=layer.v_scale).reshape(flat.shape[0], -1)
    if plan.real_index is not None:
        out = out.new_zeros(batch * length, out.shape[1]).index_copy_(0, plan.real_index, out)
    return module.o_proj(out.view(batch, length, -1)), None
