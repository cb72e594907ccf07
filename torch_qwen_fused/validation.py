"""Argument checks of ``qwen::fa_fused`` (SPEC section 5), shared by every Python-side backend.

The C++ side mirrors these checks (``check_no_grad``: csrc/inference_only.cpp; the others:
csrc/fa_fused_cpu.cpp) so that a direct ``torch.ops.qwen.fa_fused`` call on the CPU is just as safe.
Every check runs before anything is written; every message names the argument and says what was
expected and what was given.
"""

from typing import Optional

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Norm weights and RoPE tables are read value by value in any of these.
TABLE_DTYPES = SUPPORTED_DTYPES + (torch.float64,)
INDEX_DTYPES = (torch.int32, torch.int64)
MAX_HEAD_DIM = 256


def _fail(message: str) -> None:
    raise ValueError(f"fa_fused: {message}")


def _expect(condition: bool, message: str) -> None:
    if not condition:
        _fail(message)


def _expect_shape(name: str, tensor: torch.Tensor, shape: tuple) -> None:
    _expect(tuple(tensor.shape) == tuple(shape),
            f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")


def _first_bad(mask: torch.Tensor) -> int:
    return int(mask.nonzero()[0, 0])


def check_types(q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table, seq_lens,
                positions=None, slot_mapping=None) -> None:
    """Every tensor argument is a ``torch.Tensor`` (the schema enforces it for ``torch.ops`` calls)."""
    named = (("q", q), ("k", k), ("v", v), ("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight),
             ("cos", cos), ("sin", sin), ("k_cache", k_cache), ("v_cache", v_cache), ("block_table", block_table),
             ("seq_lens", seq_lens))
    for name, tensor in named:
        _expect(isinstance(tensor, torch.Tensor), f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    for name, tensor in (("positions", positions), ("slot_mapping", slot_mapping)):
        _expect(tensor is None or isinstance(tensor, torch.Tensor),
                f"{name} must be a torch.Tensor (or None), got {type(tensor).__name__}")


def check_no_grad(q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache) -> None:
    """The op is inference-only: with grad mode on, an input that requires grad is refused (RuntimeError)."""
    if not torch.is_grad_enabled():
        return
    named = (("q", q), ("k", k), ("v", v), ("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight),
             ("cos", cos), ("sin", sin), ("k_cache", k_cache), ("v_cache", v_cache))
    for name, tensor in named:
        if tensor.requires_grad:
            raise RuntimeError(f"fa_fused: {name} requires grad, but fa_fused is inference-only (it has no backward): "
                               "call it under torch.no_grad() or torch.inference_mode(), or pass detached tensors")


def check_shapes(q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table, seq_lens,
                 positions: Optional[torch.Tensor] = None, slot_mapping: Optional[torch.Tensor] = None) -> None:
    """Shapes, dtypes, devices and layouts: everything that can be checked without reading values."""
    _expect(q.dim() == 3, f"q must be 3-D [batch, num_heads, head_dim], got {q.dim()}-D shape {list(q.shape)}")
    _expect(q.dtype in SUPPORTED_DTYPES, f"q must be float32, float16 or bfloat16, got {q.dtype}")
    batch, num_heads, head_dim = q.shape
    _expect(head_dim % 16 == 0 and 0 < head_dim <= MAX_HEAD_DIM,
            f"q.shape[2] (head_dim) must be a multiple of 16 in [16, {MAX_HEAD_DIM}], got {head_dim}")
    _expect(k.dim() == 3, f"k must be 3-D [batch, num_kv_heads, head_dim], got {k.dim()}-D shape {list(k.shape)}")
    num_kv_heads = k.shape[1]
    _expect(num_kv_heads > 0 and num_heads % num_kv_heads == 0,
            f"num_heads (q.shape[1] = {num_heads}) must be a multiple of num_kv_heads (k.shape[1] = {num_kv_heads})")
    for name, tensor in (("k", k), ("v", v)):
        _expect_shape(name, tensor, (batch, num_kv_heads, head_dim))
        _expect(tensor.dtype == q.dtype, f"{name} must have q's dtype {q.dtype}, got {tensor.dtype}")
    for name, tensor in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        _expect_shape(name, tensor, (head_dim,))
        _expect(tensor.dtype in TABLE_DTYPES, f"{name} must be float32, float16, bfloat16 or float64, got {tensor.dtype}")
    for name, tensor in (("cos", cos), ("sin", sin)):
        _expect(tensor.dim() == 2 and tensor.shape[1] == head_dim,
                f"{name} must have shape [max_position, {head_dim}], got {list(tensor.shape)}")
        _expect(tensor.dtype in TABLE_DTYPES, f"{name} must be float32, float16, bfloat16 or float64, got {tensor.dtype}")
    _expect(cos.shape == sin.shape, f"sin must have cos's shape {list(cos.shape)}, got {list(sin.shape)}")
    _expect(k_cache.dim() == 4, f"k_cache must be 4-D [num_blocks, block_size, num_kv_heads, head_dim], "
                                f"got {k_cache.dim()}-D shape {list(k_cache.shape)}")
    num_blocks, block_size = k_cache.shape[:2]
    _expect(num_blocks > 0 and block_size > 0, f"k_cache must have num_blocks and block_size >= 1, "
                                               f"got {list(k_cache.shape)}")
    for name, tensor in (("k_cache", k_cache), ("v_cache", v_cache)):
        _expect_shape(name, tensor, (num_blocks, block_size, num_kv_heads, head_dim))
        _expect(tensor.dtype in SUPPORTED_DTYPES, f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}")
        _expect(tensor.is_contiguous(), f"{name} must be contiguous (it is written in place), got strides "
                                        f"{list(tensor.stride())}")
    _expect(v_cache.dtype == k_cache.dtype, f"v_cache must have k_cache's dtype {k_cache.dtype}, got {v_cache.dtype}")
    _expect(block_table.dim() == 2 and block_table.shape[0] == batch,
            f"block_table must have shape [{batch}, max_blocks], got {list(block_table.shape)}")
    _expect(block_table.dtype == torch.int32, f"block_table must be int32, got {block_table.dtype}")
    _expect_shape("seq_lens", seq_lens, (batch,))
    _expect(seq_lens.dtype == torch.int32, f"seq_lens must be int32, got {seq_lens.dtype}")
    for name, tensor in (("positions", positions), ("slot_mapping", slot_mapping)):
        if tensor is not None:
            _expect_shape(name, tensor, (batch,))
            _expect(tensor.dtype in INDEX_DTYPES, f"{name} must be int64 (or int32), got {tensor.dtype}")
    named = (("k", k), ("v", v), ("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight),
             ("cos", cos), ("sin", sin), ("k_cache", k_cache), ("v_cache", v_cache),
             ("block_table", block_table), ("seq_lens", seq_lens), ("positions", positions),
             ("slot_mapping", slot_mapping))
    for name, tensor in named:
        if tensor is not None:
            _expect(tensor.device == q.device, f"{name} must be on q's device {q.device}, got {tensor.device}")


def _byte_span(tensor: torch.Tensor) -> Optional[tuple]:
    """[first, last + 1) bytes a tensor can reach (its whole span, for any strides); None if empty."""
    if tensor.numel() == 0:
        return None
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    begin = tensor.data_ptr()
    return begin, begin + (last + 1) * tensor.element_size()


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    span_a, span_b = _byte_span(a), _byte_span(b)
    return span_a is not None and span_b is not None and span_a[0] < span_b[1] and span_b[0] < span_a[1]


def check_writes(q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table, seq_lens,
                 positions=None, slot_mapping=None) -> None:
    """The caches are written in place: refuses calls whose result would depend on the order of the writes
    and reads (shared memory), and inference-tensor caches outside ``torch.inference_mode()``."""
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _expect(torch.is_inference_mode_enabled() or not cache.is_inference(),
                f"{name} is an inference tensor (created under torch.inference_mode()) and is written in place: call "
                "fa_fused inside torch.inference_mode() too, or create the cache outside it")
    _expect(not _overlap(k_cache, v_cache),
            "v_cache shares memory with k_cache; both are written in place, so they must not overlap")
    inputs = (("q", q), ("k", k), ("v", v), ("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight),
              ("cos", cos), ("sin", sin), ("block_table", block_table), ("seq_lens", seq_lens),
              ("positions", positions), ("slot_mapping", slot_mapping))
    for name, tensor in inputs:
        for cache_name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            _expect(tensor is None or not _overlap(tensor, cache),
                    f"{name} overlaps {cache_name}, which is written in place; pass a copy")


def _check_distinct_slots(slots: list, explicit: bool) -> None:
    """Two rows writing one slot: which value stays would depend on the kernel's order."""
    writer_of_slot = {}
    for row, slot in enumerate(slots):
        if slot < 0:
            continue
        if slot in writer_of_slot:
            earlier = writer_of_slot[slot]
            if explicit:
                _fail(f"slot_mapping[{row}] = {slot} is also the slot of row {earlier}; "
                      "two rows cannot write the same cache slot")
            _fail(f"the default slot of row {row} (token seq_lens[{row}] - 1 through block_table) = {slot} is also "
                  f"the slot of row {earlier}; two rows cannot write the same cache slot")
        writer_of_slot[slot] = row


def check_values(q, k_cache, cos, block_table, seq_lens, positions=None, slot_mapping=None) -> None:
    """Index ranges read from the tensors: lengths, block ids, RoPE positions, cache slots."""
    if q.shape[0] == 0:
        return
    num_blocks, block_size = k_cache.shape[:2]
    max_blocks = block_table.shape[1]
    lens = seq_lens.long()
    if bool((lens < 1).any()):
        row = _first_bad(lens < 1)
        _fail(f"seq_lens[{row}] must be >= 1 (it counts the new token), got {int(lens[row])}")
    blocks_needed = (lens + block_size - 1) // block_size
    if bool((blocks_needed > max_blocks).any()):
        row = _first_bad(blocks_needed > max_blocks)
        _fail(f"seq_lens[{row}] = {int(lens[row])} needs {int(blocks_needed[row])} blocks of {block_size}, "
              f"but block_table has {max_blocks} columns")
    in_use = torch.arange(max_blocks, device=lens.device) < blocks_needed.unsqueeze(1)
    bad_block = in_use & ((block_table < 0) | (block_table >= num_blocks))
    if bool(bad_block.any()):
        row, col = (int(i) for i in bad_block.nonzero()[0])
        _fail(f"block_table[{row}, {col}] = {int(block_table[row, col])} is outside the cache's "
              f"blocks [0, {num_blocks})")
    if positions is not None:
        bad = (positions < 0) | (positions >= cos.shape[0])
        if bool(bad.any()):
            row = _first_bad(bad)
            _fail(f"positions[{row}] = {int(positions[row])} is outside the cos/sin table [0, {cos.shape[0]})")
    elif bool((lens > cos.shape[0]).any()):
        row = _first_bad(lens > cos.shape[0])
        _fail(f"default position seq_lens[{row}] - 1 = {int(lens[row]) - 1} is outside the cos/sin table "
              f"[0, {cos.shape[0]})")
    if slot_mapping is not None:
        bad = (slot_mapping < -1) | (slot_mapping >= num_blocks * block_size)
        if bool(bad.any()):
            row = _first_bad(bad)
            _fail(f"slot_mapping[{row}] = {int(slot_mapping[row])} is outside the cache's slots "
                  f"[0, {num_blocks * block_size}) (or -1 to skip the write)")
        _check_distinct_slots(slot_mapping.tolist(), explicit=True)
    else:
        last = lens - 1
        blocks = block_table.long().gather(1, (last // block_size).unsqueeze(1)).squeeze(1)
        _check_distinct_slots((blocks * block_size + last % block_size).tolist(), explicit=False)


def validate(q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table, seq_lens,
             positions=None, slot_mapping=None) -> None:
    """All checks of SPEC section 5, in the order the C++ op runs them; raises ``ValueError`` naming the
    argument (``RuntimeError`` for an input that requires grad)."""
    args = (q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table, seq_lens,
            positions, slot_mapping)
    check_types(*args)
    check_no_grad(*args[:9])
    check_shapes(*args)
    check_writes(*args)
    check_values(q, k_cache, cos, block_table, seq_lens, positions, slot_mapping)
