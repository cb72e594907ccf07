"""One call that makes a stock Hugging Face Qwen3 (or Qwen3-MoE) model decode through ``torch.ops.qwen.fa_fused``.

``patch_model(model)`` rebinds ``forward`` on *that* model's attention modules (the class, and every other
instance, stay stock), hooks its base model to plan each step in a ``PagedKVCache``, and makes its plain
``generate()`` use a ``PagedKVCache``. Then, with a ``PagedKVCache``:

* each decode step (one new real token per row, a mask that sees exactly the cached tokens) of each layer
  is one ``torch.ops.qwen.fa_fused`` call: qk-norm, RoPE at HF's ``position_ids``, the cache write and paged
  GQA attention over the row's real tokens, then the stock ``o_proj``;
* every other step runs the stock attention code (q/k norm, RoPE, the model's own mask and attention
  implementation): prefill and its chunks, assisted decoding's verification of several tokens, and any step
  that needs what the op does not give: attention weights (``output_attentions`` as a kwarg or in the
  config), dropout, gradients (the op is inference-only). The cache's ``update`` writes the real tokens'
  normed, roped K and raw V into the pools (padding is dropped) and returns the seen positions in
  ``DynamicCache``'s layout, so stock's masks and attention weights come out as stock's.

``generate(..., compile_config=CompileConfig(fullgraph=True))`` compiles the decode forward once with a
``PagedKVCache`` too, the step planned and committed around the compiled call (``PatchHandle.wrap_compiled``, which a
forward compiled by hand can use as well).

With HF's continuous-batching ``PagedAttentionCache`` (``generate_batch``, ``init_continuous_batching``,
``transformers serve --continuous-batching``) each step of each layer is one ``fa_fused`` (all decode) or
``fa_fused_varlen`` call on HF's own pages (``continuous_batching.py``), and HF's block-table decode path is on.

Any other cache (``DynamicCache``, ``StaticCache``, none) runs the stock forward untouched.
"""

import copy
import inspect
import weakref
from typing import Optional

import torch

from .. import _C  # noqa: F401  (registers torch.ops.qwen.fa_fused)
from .cache import PagedKVCache
from .continuous_batching import (BatchStep, disable_block_table_decode, enable_block_table_decode,
                                  fused_batch_attention, is_continuous_batching_cache, plan_batch_step)
from .decode import (can_fuse, can_fuse_several, fused_decode, fused_several_tokens, needs_only_what_the_ops_give,
                     output_attentions_requested)
from .rope import MIN_ROPE_TABLE, ModelRope
from .tensor_parallel import local_head_counts

__all__ = ["patch_model", "PatchHandle"]


class _Missing:
    """Marks an attribute that was not in an instance ``__dict__``; one object, which copies keep."""

    def __reduce__(self):
        return "_MISSING"


_MISSING = _Missing()
_HANDLES = weakref.WeakKeyDictionary()          # model -> its active PatchHandle
_PATCHED_MODULES = weakref.WeakKeyDictionary()  # attention module -> the PatchHandle that patched it


def _parameter_names(module) -> list:
    """The names of ``module.forward``'s positional-or-keyword parameters, after ``self``."""
    return [name for name, parameter in inspect.signature(type(module).forward).parameters.items()
            if parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD][1:]


def _tokens(given: dict) -> torch.Tensor:
    """A forward's ``input_ids``, else its ``inputs_embeds``: (batch, new tokens, ...)."""
    tokens = given.get("input_ids")
    return tokens if tokens is not None else given.get("inputs_embeds")


def _qwen3_classes():
    """(attention classes, base model classes), imported lazily: only HF users import this module."""
    from transformers.models.qwen3 import modeling_qwen3
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    return ((modeling_qwen3.Qwen3Attention, modeling_qwen3_moe.Qwen3MoeAttention),
            (modeling_qwen3.Qwen3Model, modeling_qwen3_moe.Qwen3MoeModel))


class _PatchedMethod:
    """What ``patch_model`` puts in an instance ``__dict__``: calls ``handle.<method>(owner, original, ...)``.

    An object, not a closure, so that ``copy.deepcopy`` of a patched model rebinds it to the copy's owner,
    its original method and the copy's handle (a closure would keep computing with the original's weights).
    """

    def __init__(self, handle: "PatchHandle", method: str, owner, name: str):
        self.handle, self.method, self.owner, self.original = handle, method, owner, getattr(owner, name)
        self.__doc__ = f"torch_qwen_fused.hf patched {type(owner).__name__}.{name}"

    @property
    def _torch_qwen_fused_patch(self) -> "PatchHandle":
        return self.handle

    def __call__(self, *args, **kwargs):
        return getattr(self.handle, self.method)(self.owner, self.original, *args, **kwargs)


class PatchHandle:
    """What ``patch_model`` returns: undo it with ``remove()`` or by leaving a ``with`` block.

    Attributes:
        fused_calls: how many attention calls went through ``torch.ops.qwen.fa_fused`` (one per layer per
            decode step: one new token per row), counted when each step ends (a step records its layers' calls:
            a compiled layer replays that record, not a counter's traced value).
        varlen_calls: how many went through ``torch.ops.qwen.fa_fused_varlen`` (one per layer per step of
            several new tokens over a cache that holds tokens: assisted decoding's verification, prefill chunks
            after the first).
        block_size, num_blocks, max_memory: how the caches that ``generate()`` builds are sized (see
            ``new_cache``).
        num_kv_heads: the kv heads of each layer on this rank (all of them, but for HF tensor parallelism: the
            rank's shard), what its caches hold.
        last_cache: the last ``PagedKVCache`` the patched ``generate()`` built (held weakly), or None.

    A deep copy of a patched model (``copy.deepcopy``, TRL's ``create_reference_model``) is patched by its own
    copy of the handle, with its own weights; ``patch_model(copy)`` returns that handle.
    """

    def __init__(self, model, base, attentions, num_kv_heads, block_size, num_blocks, max_memory,
                 kv_cache_dtype=None):
        self.model = model
        self.num_kv_heads = num_kv_heads
        self.fused_calls = 0
        self.varlen_calls = 0
        self._base = base
        self._attentions = attentions
        self._configure(block_size, num_blocks, max_memory, kv_cache_dtype)
        self._saved = []          # (object, attribute, value in its __dict__ or _MISSING)
        self._hooks = []
        self._last_cache = None
        self._active = False
        self._rope = ModelRope(base, attentions[0].head_dim)
        # The continuous-batching step between the base model's hooks (a PagedKVCache holds its own step's plan).
        self._batch_step: Optional[BatchStep] = None
        self._managers = []       # weak references to the continuous-batching managers whose decode path it turned on
        self._base_parameters = _parameter_names(base)
        self._model_parameters = _parameter_names(model)

    def __deepcopy__(self, memo):
        """Reached through the copied model's hooks and patched methods: the copy's handle, on its modules."""
        copied = PatchHandle.__new__(PatchHandle)
        memo[id(self)] = copied
        for name, value in self.__dict__.items():
            copied.__dict__[name] = copy.deepcopy(value, memo)
        copied._last_cache = None
        copied._managers = []
        if copied._active:
            _HANDLES[copied.model] = copied
            for module in copied._attentions:
                _PATCHED_MODULES[module] = copied
        return copied

    def _configure(self, block_size, num_blocks, max_memory, kv_cache_dtype):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"patch_model: block_size must be an int >= 1, got {block_size!r}")
        if num_blocks is not None and max_memory is not None:
            raise ValueError("patch_model: give num_blocks or max_memory, not both")
        cache_dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)
        if kv_cache_dtype is not None and kv_cache_dtype not in cache_dtypes:
            raise ValueError(f"patch_model: kv_cache_dtype must be None (the model's dtype) or one of {cache_dtypes}, "
                             f"got {kv_cache_dtype!r}")
        self.block_size, self.num_blocks, self.max_memory = block_size, num_blocks, max_memory
        self.kv_cache_dtype = kv_cache_dtype

    @property
    def active(self) -> bool:
        return self._active

    @property
    def last_cache(self) -> Optional[PagedKVCache]:
        return self._last_cache() if self._last_cache is not None else None

    @property
    def _weight(self) -> torch.Tensor:
        """A projection weight: the model's dtype and device now (read at each use, as the model may be cast)."""
        return self._attentions[0].k_proj.weight

    def __repr__(self):
        return (f"PatchHandle({type(self.model).__name__}, {len(self._attentions)} attention modules, "
                f"active={self._active}, fused_calls={self.fused_calls}, block_size={self.block_size})")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def new_cache(self, batch_size: Optional[int] = None, max_length: Optional[int] = None) -> PagedKVCache:
        """A ``PagedKVCache`` for this model, in its dtype and on its device (as they are now).

        With ``num_blocks``/``max_memory`` given to ``patch_model`` the pool has that fixed size. Otherwise it
        grows as needed (as a ``DynamicCache`` does: assisted decoding's draft cache and a cache passed to a
        later ``generate()`` outlive the call that built them), starting, given ``batch_size`` and
        ``max_length`` (tokens per row, padding included), at exactly ``batch_size * ceil(max_length /
        block_size)`` blocks (enough for the call: padding is never stored).
        """
        fixed = self.num_blocks is not None or self.max_memory is not None
        num_blocks = self.num_blocks
        if not fixed and batch_size and max_length:
            num_blocks = batch_size * -(-max_length // self.block_size)
        weight = self._weight
        cache = PagedKVCache(self.model.config, block_size=self.block_size, num_blocks=num_blocks,
                             max_memory=self.max_memory, num_kv_heads=self.num_kv_heads,
                             cache_dtype=self.kv_cache_dtype or weight.dtype,
                             device=weight.device, growable=not fixed)
        self._last_cache = weakref.ref(cache)
        return cache

    # ------------------------------------------------------------------ patching
    def _apply(self):
        for module in self._attentions:
            self._install(module, "forward", "_attention_forward")
            _PATCHED_MODULES[module] = self
        self._hooks.append(self._base.register_forward_pre_hook(self._begin_step, with_kwargs=True))
        self._hooks.append(self._base.register_forward_hook(self._end_step, with_kwargs=True))
        if hasattr(self.model, "_prepare_cache_for_generation"):
            self._install(self.model, "_prepare_cache_for_generation", "_prepare_cache")
        if hasattr(self.model, "_valid_auto_compile_criteria"):     # generate()'s compiled decode (GenerationMixin)
            self._install(self.model, "get_compiled_call", "_get_compiled_call")
            self._install(self.model, "_valid_auto_compile_criteria", "_valid_auto_compile_criteria")
        if hasattr(self.model, "init_continuous_batching"):
            self._install(self.model, "init_continuous_batching", "_init_continuous_batching")
        self._active = True

    def _install(self, owner, name, method):
        self._saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, _PatchedMethod(self, method, owner, name))

    def remove(self) -> None:
        """Restores the stock behaviour exactly (the original bound methods, no hooks, HF's decode path setting on the
        continuous-batching managers the patch built, kept ones included). Idempotent. Raises ``RuntimeError``, with
        nothing changed, while such a manager is running: stop it first."""
        if not self._active:
            return
        managers = [manager for manager in (ref() for ref in self._managers) if manager is not None]
        if any(manager.is_running() for manager in managers):
            raise RuntimeError("PatchHandle.remove: a continuous-batching manager built while patched is running, on "
                               "the fused block-table decode path that stock attention cannot serve; stop it "
                               "(manager.stop()) before removing the patch")
        for manager in managers:
            disable_block_table_decode(manager)
        self._managers = []
        self._active = False
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for obj, name, value in reversed(self._saved):
            if value is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = value
        self._saved = []
        for module in self._attentions:
            _PATCHED_MODULES.pop(module, None)
        if _HANDLES.get(self.model) is self:
            del _HANDLES[self.model]

    def _prepare_cache(self, model, original, generation_config, model_kwargs, generation_mode, batch_size,
                       max_cache_length):
        """``generate()``'s cache set-up: a ``PagedKVCache`` where stock would build its default ``DynamicCache``."""
        from transformers.cache_utils import DynamicCache

        user_cache = model_kwargs.get("cache")
        result = original(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
        cache = model_kwargs.get("cache")
        if (self._active and user_cache is None and type(cache) is DynamicCache
                and not getattr(cache, "offloading", False)
                and generation_config.cache_implementation in (None, "dynamic")):
            rows = batch_size * max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
            model_kwargs["cache"] = self.new_cache(rows, max_cache_length)
        return result

    def _init_continuous_batching(self, model, original, generation_config=None, continuous_batching_config=None,
                                  workload_hints=None):
        """HF's continuous-batching manager, with its block-table decode path on (HF turns it off but for flash
        attention on CUDA/XPU; the fused decode reads the block table)."""
        manager = original(generation_config=generation_config, continuous_batching_config=continuous_batching_config,
                           workload_hints=workload_hints)
        if self._active and enable_block_table_decode(manager, continuous_batching_config, workload_hints):
            self._managers.append(weakref.ref(manager))
        return manager

    # ------------------------------------------------------------------ per step (hooks on the base model)
    def _begin_step(self, module, args, kwargs):
        """Plans the step once for all layers, in its PagedKVCache or from HF's continuous-batching arguments, from
        the base model's arguments (Qwen3Model.forward(input_ids, attention_mask, position_ids, cache, inputs_embeds,
        use_cache, **kwargs)); not a step that ``wrap_compiled`` planned ahead."""
        given, cache = self._step_arguments(self._base_parameters, args, kwargs)
        if is_continuous_batching_cache(cache):
            self._batch_step = plan_batch_step(cache, given, _tokens(given).shape[1],
                                               output_attentions_requested(module, given))
            return None
        if isinstance(cache, PagedKVCache) and not (cache.current_plan is not None and cache.current_plan.ahead):
            self._plan_step(cache, given)
        return None

    def _end_step(self, module, args, kwargs, output):
        """Counts the step's op calls and commits it in its PagedKVCache (the cache owns its plan; not a step that
        ``wrap_compiled`` commits), or drops the continuous-batching one."""
        step, self._batch_step = self._batch_step, None
        cache = self._step_arguments(self._base_parameters, args, kwargs)[1]
        if isinstance(cache, PagedKVCache) and cache.current_plan is not None and not cache.current_plan.ahead:
            step = cache.current_plan
            cache.end_forward()
        self._count(step)
        return None

    def _plan_step(self, cache: PagedKVCache, given: dict):
        """``cache.begin_forward`` for a forward with these arguments (the base model's, or the model's: the same
        names); the RoPE tables grown to its positions."""
        if cache.num_kv_heads != self.num_kv_heads:
            raise ValueError(f"{type(self._base).__name__}: the PagedKVCache holds {cache.num_kv_heads} kv heads per "
                             f"layer, this model's attention has {self.num_kv_heads} (on this rank, under tensor "
                             f"parallelism); build it with the patch handle's new_cache() or PagedKVCache(config, "
                             f"num_kv_heads={self.num_kv_heads})")
        tokens, weight = _tokens(given), self._weight
        plan = cache.begin_forward(tokens.shape[0], tokens.shape[1], attention_mask=given.get("attention_mask"),
                                   position_ids=given.get("position_ids"), dtype=weight.dtype, device=weight.device,
                                   output_attentions=output_attentions_requested(self._base, given))
        self._rope.ensure(int(plan.positions.max()) + 1)
        return plan

    def _count(self, step) -> None:
        if step is not None:
            self.fused_calls += step.layer_calls.count("fa_fused")
            self.varlen_calls += step.layer_calls.count("fa_fused_varlen")

    # ------------------------------------------------------------------ a compiled forward (whole model)
    def wrap_compiled(self, call):
        """``call`` (this model's forward compiled whole, e.g. ``torch.compile(model, fullgraph=True)``) with each
        step through a ``PagedKVCache`` planned before it and committed after it, eagerly; a patched ``generate()``
        wraps the forward it compiles (``compile_config``) this way.

        The planning (which new tokens are real, the blocks they need, whether the mask sees exactly the cached
        tokens) reads tensors' values into Python, which ``fullgraph=True`` forbids; inside ``call`` the hooks find
        the step planned and the layers read the plan's tensors, so every decode step replays one graph. The
        returned callable takes the model's arguments (``input_ids``, ``attention_mask``, ``position_ids``,
        ``cache``, ...); any other cache passes through untouched.
        """
        def step(*args, **kwargs):
            given, cache = self._step_arguments(self._model_parameters, args, kwargs)
            if not (self._active and isinstance(cache, PagedKVCache)):
                return call(*args, **kwargs)
            plan = self._plan_step(cache, given)
            plan.ahead = True
            # One more seen position each step: dynamic from the first, not a recompile at the second.
            torch._dynamo.maybe_mark_dynamic(cache.stored_positions, 1)
            mask = given.get("attention_mask")
            if mask is not None and mask.dim() == 2:    # (batch, seen + new)
                torch._dynamo.maybe_mark_dynamic(mask, 1)
            try:
                output = call(*args, **kwargs)
            except BaseException:
                plan.ahead = False    # undone by the next step's planning, as an eager step that raised
                raise
            cache.end_forward()
            self._count(plan)
            return output

        return step

    def _get_compiled_call(self, model, original, compile_config):
        """``generate()``'s compiled forward, wrapped by ``wrap_compiled``."""
        return self.wrap_compiled(original(compile_config))

    def _valid_auto_compile_criteria(self, model, original, model_kwargs, generation_config):
        """``generate()``'s choice to compile its decode forward: HF's own criteria, a ``PagedKVCache`` counting as
        a compileable cache when ``compile_config`` asks for compilation. Not marked ``is_compileable`` for good:
        HF would then compile it on accelerators unasked and turn each step's 2-D mask into a 4-D one, from which
        the step's plan cannot tell that the mask sees exactly the cached tokens (no fused decode)."""
        cache = model_kwargs.get("cache")
        if not (self._active and isinstance(cache, PagedKVCache) and generation_config.compile_config is not None):
            return original(model_kwargs, generation_config)
        cache.is_compileable = True
        try:
            return original(model_kwargs, generation_config)
        finally:
            del cache.is_compileable

    @staticmethod
    def _step_arguments(names, args, kwargs) -> tuple:
        """(a forward's arguments by name, its cache). Bound by zipping the names read once: binding a signature at
        each step would graph-break under torch.compile (inspect's mapping proxy)."""
        given = dict(zip(names, args))
        given.update(kwargs)
        cache = given.get("cache")
        return given, cache if cache is not None else given.get("past_key_values")   # the deprecated name

    # ------------------------------------------------------------------ the patched attention forward
    def _attention_forward(self, module, original, hidden_states, position_embeddings=None, attention_mask=None,
                           cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        step = self._batch_step
        if self._active and step is not None and cache is step.cache:
            if needs_only_what_the_ops_give(module, hidden_states, step, kwargs):
                step.layer_calls[module.layer_idx] = "fa_fused" if step.decode else "fa_fused_varlen"
                return fused_batch_attention(module, hidden_states, position_embeddings, step)
            if step.block_table_path:
                raise NotImplementedError(
                    f"layer {module.layer_idx}: a continuous-batching decode step of a patched model needs the fused "
                    "op (HF's block-table decode path is on), but this step asks for what it does not give "
                    "(attention weights, dropout or gradients)")
        if not (self._active and isinstance(cache, PagedKVCache)):
            return original(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
        plan = cache.current_plan
        if plan is None:
            cache.require_plan(f"layer {module.layer_idx}")  # raises: no step in progress
        # The calls are recorded in the step and counted when it ends: a counter incremented here would be a constant
        # to torch.compile (guarded, and replayed as the value it had when traced).
        if can_fuse(module, hidden_states, plan, kwargs):
            plan.layer_calls[module.layer_idx] = "fa_fused"
            return fused_decode(module, hidden_states, cache, plan, self._rope.cos, self._rope.sin)
        if can_fuse_several(module, hidden_states, plan, kwargs):
            plan.layer_calls[module.layer_idx] = "fa_fused_varlen"
            return fused_several_tokens(module, hidden_states, cache, plan, self._rope.cos, self._rope.sin)
        # Stock code: the cache's update returns every seen position in DynamicCache's layout, so the model's
        # own mask, attention implementation and attention weights apply unchanged.
        return original(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)

def patch_model(model, block_size: int = 128, num_blocks: Optional[int] = None,
                max_memory: Optional[int] = None, kv_cache_dtype: Optional[torch.dtype] = None) -> PatchHandle:
    """Makes this Qwen3 / Qwen3-MoE model decode through ``torch.ops.qwen.fa_fused`` with a paged KV cache.

    Rebinds ``forward`` on the model's own attention modules (not the class: other instances stay stock),
    hooks its base model (``Qwen3Model``/``Qwen3MoeModel``) so that each step is planned once in the
    ``PagedKVCache`` (which new tokens are real, their slots and RoPE positions), and makes ``generate()``
    build a ``PagedKVCache`` when it would have built its default ``DynamicCache``. An explicit
    ``generate(..., cache=PagedKVCache(model.config))`` (or the deprecated ``past_key_values=``) works too.
    Prefill keeps the stock attention math; every decode step (one new token per row) of every layer is one
    ``fa_fused`` call, with HF's ``position_ids`` as RoPE positions and only real tokens in the cache.

    Arguments:
        model: a transformers Qwen3 or Qwen3-MoE model (``*ForCausalLM`` or the base model).
        block_size: tokens per cache block of the caches ``generate()`` builds, >= 1. Default 128.
        num_blocks [optional]: fixed pool size of those caches (blocks shared by all rows).
        max_memory [optional]: bytes for the K and V pools of all layers; sets num_blocks. Default (neither):
            each ``generate()`` call gets ``rows * ceil(max_length / block_size)`` blocks, and more if the
            cache is used further (a draft model's cache, a cache passed to a later ``generate()``).
        kv_cache_dtype [optional]: the pools' dtype; default the model's. ``torch.float8_e4m3fn`` /
            ``float8_e5m2``: an fp8 cache, half bf16's bytes; each layer's K/V scales are calibrated from its
            prefill (absolute maximum over the fp8 range) and passed to ``fa_fused`` as ``k_scale`` / ``v_scale``.

    Return:
        a ``PatchHandle``: ``handle.remove()`` (or leaving ``with patch_model(model) as handle:``) restores the
        stock model exactly; ``handle.fused_calls`` counts the ``fa_fused`` calls. Patching a patched model
        returns its handle, with the new settings.

    Raises:
        TypeError if the model has no Qwen3 attention; NotImplementedError for sliding-window attention,
        dynamic RoPE, or a head_dim the op cannot take; ValueError for bad settings.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch_model: model must be a transformers Qwen3 or Qwen3-MoE model (a torch.nn.Module), "
                        f"got {type(model).__name__}")
    handle = _HANDLES.get(model)
    if handle is not None and handle.active:
        handle._configure(block_size, num_blocks, max_memory, kv_cache_dtype)
        return handle
    attention_classes, base_classes = _qwen3_classes()
    attentions = [m for m in model.modules() if isinstance(m, attention_classes)]
    if not attentions:
        raise TypeError(f"patch_model: {type(model).__name__} has no Qwen3 attention module "
                        f"({', '.join(c.__name__ for c in attention_classes)}); only Qwen3 and Qwen3-MoE "
                        "models can be patched")
    bases = [m for m in model.modules() if isinstance(m, base_classes)]
    if len(bases) != 1:
        raise TypeError(f"patch_model: expected one Qwen3Model/Qwen3MoeModel inside {type(model).__name__}, "
                        f"found {len(bases)}")
    for module in attentions:
        owner = _PATCHED_MODULES.get(module)
        if owner is not None and owner.active:
            raise ValueError(f"patch_model: layer {module.layer_idx} of {type(model).__name__} is already patched "
                             f"through {type(owner.model).__name__}; remove that handle first")
        if module.sliding_window is not None:
            raise NotImplementedError(f"patch_model: layer {module.layer_idx} uses sliding-window attention "
                                      f"({module.sliding_window}); the paged decode path attends to whole rows")
        if module.head_dim % 16 or not 16 <= module.head_dim <= 256:
            raise NotImplementedError(f"patch_model: fa_fused takes a head_dim that is a multiple of 16 up to 256, "
                                      f"the model has {module.head_dim}")
        if module.q_norm.variance_epsilon != module.k_norm.variance_epsilon:
            raise NotImplementedError("patch_model: q_norm and k_norm have different eps; fa_fused takes one")
    kv_heads = {local_head_counts(module)[1] for module in attentions}
    if len(kv_heads) != 1:
        raise NotImplementedError(f"patch_model: the layers have different kv head counts {sorted(kv_heads)}; "
                                  "a PagedKVCache holds one")
    handle = PatchHandle(model, bases[0], attentions, kv_heads.pop(), block_size, num_blocks, max_memory,
                         kv_cache_dtype)
    if not bases[0].rotary_emb.inv_freq.is_meta:   # a meta model has no values: its tables wait for its first step
        handle._rope.ensure(MIN_ROPE_TABLE)
    handle._apply()
    _HANDLES[model] = handle
    return handle
