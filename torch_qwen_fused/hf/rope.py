"""The RoPE tables ``fa_fused`` reads for a Hugging Face Qwen3 model: the model's own rotary embedding,
evaluated in fp32 once per ``inv_freq`` buffer (a cast or a move of the model replaces it; the tables follow)."""

import warnings

import torch

from ..rope import rope_cos_sin

__all__ = ["ModelRope", "MIN_ROPE_TABLE"]

MIN_ROPE_TABLE = 4096
_ROPE_CHECK_POSITIONS = 2048


def _rope_settings(config):
    parameters = getattr(config, "rope_parameters", None) or {}
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", None))
    if rope_type == "default" and theta is None:
        raise ValueError("patch_model: the config has no rope_theta (config.rope_parameters['rope_theta'])")
    if rope_type == "dynamic" or rope_type == "longrope":
        raise NotImplementedError(f"patch_model: rope_type={rope_type!r} rescales RoPE with the sequence length; "
                                  "fa_fused takes fixed cos/sin tables")
    return rope_type, theta


class ModelRope:
    """fp32 rotate-half ``cos``/``sin`` [positions, head_dim] of one model, grown and rebuilt on demand.

    Raises NotImplementedError at construction for RoPE types that rescale with the sequence length.
    """

    def __init__(self, base_model, head_dim: int):
        self._base = base_model
        self.head_dim = head_dim
        self.cos = self.sin = None
        self._inv_freq, self._version = None, None
        self._type, self._theta = _rope_settings(base_model.config.get_text_config(decoder=True))

    def ensure(self, positions: int) -> None:
        """Tables that cover ``positions`` positions, from the model's current ``inv_freq``."""
        inv_freq = self._base.rotary_emb.inv_freq
        same_source = self._inv_freq is inv_freq and self._version == inv_freq._version
        if same_source and self.cos.shape[0] >= positions:
            return
        size = max(positions, MIN_ROPE_TABLE, 2 * self.cos.shape[0] if same_source else 0)
        self.cos, self.sin = self._evaluate(size, inv_freq.device)
        for table in (self.cos, self.sin):   # dynamic to torch.compile: a compiled layer is not recompiled as they grow
            torch._dynamo.maybe_mark_dynamic(table, 0)
        if not same_source:
            self._inv_freq, self._version = inv_freq, inv_freq._version
            self._check_theta()

    def _evaluate(self, size: int, device):
        """The model's rotary embedding at positions 0..size-1, in fp32 (as stock computes it before casting
        to the activations' dtype). Its inv_freq buffer is used as it is, so a model cast with ``.to(dtype)``
        (which rounds inv_freq too) keeps its stock RoPE."""
        probe = torch.zeros(1, 1, self.head_dim, dtype=torch.float32, device=device)
        positions = torch.arange(size, device=device).unsqueeze(0)
        with torch.no_grad():
            cos, sin = self._base.rotary_emb(probe, positions)
        return cos[0].float().contiguous(), sin[0].float().contiguous()

    def _check_theta(self) -> None:
        """For the default RoPE, the model's tables should be ``rope_cos_sin(rope_theta)``; warn if not."""
        if self._type != "default":
            return
        check = min(_ROPE_CHECK_POSITIONS, self.cos.shape[0])
        cos, sin = rope_cos_sin(check, self.head_dim, self._theta, torch.float32, self.cos.device)
        error = max((cos - self.cos[:check]).abs().max().item(), (sin - self.sin[:check]).abs().max().item())
        if error > 1e-5:
            warnings.warn(f"patch_model: the model's rotary embedding differs from rope_cos_sin(rope_theta="
                          f"{self._theta}) by up to {error:.3g} over {check} positions (its inv_freq buffer is "
                          f"{self._inv_freq.dtype}: was the model cast with .to(dtype)?). fa_fused "
                          "uses the model's own tables, as stock attention does.", stacklevel=5)
