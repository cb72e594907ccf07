"""The ops' fake kernels (torch.compile, torch.export, meta tensors): the output's shape, after the checks of
csrc/validation.cpp that need no values (shapes, dtypes, devices), with the same messages.

A fake kernel is also the ops' Meta kernel, and the dispatcher picks it whenever *one* argument is a meta
tensor: the device check is what keeps ``fa_fused(..., block_table.to("meta"), ...)`` with every other tensor
on the CPU from returning uninitialized memory. ``torch._check_value`` raises the ValueError the real kernels
raise and, on symbolic shapes, records a runtime assertion instead of specializing.
"""

import torch

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
TABLE_FLOATS = FLOATS + (torch.float64,)
CACHE_FLOATS = FLOATS + (torch.float8_e4m3fn, torch.float8_e5m2)
MAX_HEAD_DIM = 256


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _check_one_device(op: str, named: dict) -> None:
    """The odd one out named against the device most arguments are on (q's on a tie), as validation.cpp does."""
    devices = [t.device for t in named.values() if t is not None]
    common = max(dict.fromkeys(devices), key=devices.count)   # the first (q's) among the most common
    for name, t in named.items():
        if t is not None:
            message = f"{op}: {name} must be on the device of the other arguments, {common}, got {t.device}"
            torch._check_value(t.device == common, lambda message=message: message)


def _check_shape(op: str, name: str, t: torch.Tensor, shape: tuple, what: str = "") -> None:
    expected = "[" + ", ".join(str(s) for s in shape) + "]"
    torch._check_value(t.dim() == len(shape) and all(a == b for a, b in zip(t.shape, shape)),
                       lambda: f"{op}: {name} must have shape {expected}{what}, got {_shape(t)}")


def _check_dtype(op: str, name: str, t: torch.Tensor, allowed: tuple, words: str) -> None:
    torch._check_value(t.dtype in allowed, lambda: f"{op}: {name} must be {words}, got {t.dtype}")


def check_arguments(op: str, q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table,
                    seq_lens, query_start_loc, positions, slot_mapping, k_scale, v_scale) -> None:
    """validate()'s shape, dtype and device checks (csrc/validation.cpp, check_shapes), on fake tensors."""
    named = dict(q=q, k=k, v=v, q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, cos=cos, sin=sin,
                 k_cache=k_cache, v_cache=v_cache, block_table=block_table, seq_lens=seq_lens,
                 query_start_loc=query_start_loc, positions=positions, slot_mapping=slot_mapping, k_scale=k_scale,
                 v_scale=v_scale)
    rows = "num_tokens" if query_start_loc is not None else "batch"
    torch._check_value(q.dim() == 3, lambda: f"{op}: q must be 3-D [{rows}, num_heads, head_dim], got {q.dim()}-D "
                                             f"shape {_shape(q)}")
    _check_dtype(op, "q", q, FLOATS, "float32, float16 or bfloat16")
    tokens, num_heads, head_dim = q.shape
    torch._check_value(head_dim % 16 == 0 and 0 < head_dim <= MAX_HEAD_DIM,
                       lambda: f"{op}: q.shape[2] (head_dim) must be a multiple of 16 in [16, {MAX_HEAD_DIM}], got "
                               f"{head_dim}")
    torch._check_value(k.dim() == 3, lambda: f"{op}: k must be 3-D [{rows}, num_kv_heads, head_dim], got {k.dim()}-D "
                                             f"shape {_shape(k)}")
    num_kv_heads = k.shape[1]
    torch._check_value(num_kv_heads > 0 and num_heads % num_kv_heads == 0,
                       lambda: f"{op}: num_heads (q.shape[1] = {num_heads}) must be a multiple of num_kv_heads "
                               f"(k.shape[1] = {num_kv_heads})")
    for name in ("k", "v"):
        _check_shape(op, name, named[name], (tokens, num_kv_heads, head_dim))
        _check_dtype(op, name, named[name], (q.dtype,), f"q's dtype {q.dtype}")
    for name in ("q_norm_weight", "k_norm_weight"):
        _check_shape(op, name, named[name], (head_dim,))
        _check_dtype(op, name, named[name], TABLE_FLOATS, "float32, float16, bfloat16 or float64")
    for name in ("cos", "sin"):
        table = named[name]
        message = f"{op}: {name} must have shape [max_position, {head_dim}], got {_shape(table)}"
        torch._check_value(table.dim() == 2 and table.shape[1] == head_dim, lambda message=message: message)
        _check_dtype(op, name, table, TABLE_FLOATS, "float32, float16, bfloat16 or float64")
    torch._check_value(cos.shape == sin.shape,
                       lambda: f"{op}: sin must have cos's shape {_shape(cos)}, got {_shape(sin)}")
    torch._check_value(k_cache.dim() == 4, lambda: f"{op}: k_cache must be 4-D [num_blocks, block_size, "
                                                   f"num_kv_heads, head_dim], got {k_cache.dim()}-D shape "
                                                   f"{_shape(k_cache)}")
    num_blocks, block_size = k_cache.shape[:2]
    for name in ("k_cache", "v_cache"):
        _check_shape(op, name, named[name], (num_blocks, block_size, num_kv_heads, head_dim))
        _check_dtype(op, name, named[name], CACHE_FLOATS,
                     "float32, float16, bfloat16, float8_e4m3fn or float8_e5m2")
    _check_dtype(op, "v_cache", v_cache, (k_cache.dtype,), f"k_cache's dtype {k_cache.dtype}")
    batch = seq_lens.shape[0] if query_start_loc is not None else tokens
    _check_shape(op, "seq_lens", seq_lens, (batch,))
    _check_dtype(op, "seq_lens", seq_lens, (torch.int32,), "int32")
    if query_start_loc is not None:
        _check_shape(op, "query_start_loc", query_start_loc, (batch + 1,), " (batch + 1)")
        _check_dtype(op, "query_start_loc", query_start_loc, (torch.int32,), "int32")
    torch._check_value(block_table.dim() == 2 and block_table.shape[0] == batch,
                       lambda: f"{op}: block_table must have shape [{batch}, max_blocks], got {_shape(block_table)}")
    _check_dtype(op, "block_table", block_table, (torch.int32,), "int32")
    for name in ("k_scale", "v_scale"):
        scale = named[name]
        if scale is not None:
            message = (f"{op}: {name} must be a float32 tensor of one element (the layer's scale), got shape "
                       f"{_shape(scale)} and {scale.dtype}")
            torch._check_value(scale.numel() == 1 and scale.dtype == torch.float32, lambda message=message: message)
    for name in ("positions", "slot_mapping"):
        if named[name] is not None:
            _check_shape(op, name, named[name], (tokens,))
            _check_dtype(op, name, named[name], (torch.int64, torch.int32), "int64 (or int32)")
    _check_one_device(op, named)


@torch.library.register_fake("qwen::fa_fused")
def _fa_fused_fake(q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table, seq_lens,
                   positions=None, slot_mapping=None, eps=1e-6, scale=None, k_scale=None, v_scale=None):
    check_arguments("fa_fused", q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table,
                    seq_lens, None, positions, slot_mapping, k_scale, v_scale)
    return q.new_empty(q.shape)


@torch.library.register_fake("qwen::fa_fused_varlen")
def _fa_fused_varlen_fake(q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table, seq_lens,
                          query_start_loc, positions=None, slot_mapping=None, eps=1e-6, scale=None, k_scale=None,
                          v_scale=None):
    check_arguments("fa_fused_varlen", q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache,
                    block_table, seq_lens, query_start_loc, positions, slot_mapping, k_scale, v_scale)
    return q.new_empty(q.shape)
