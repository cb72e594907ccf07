"""Test inputs and the yardstick for ``qwen::fa_fused``, shared by the tests and the benchmarks.

``make_case`` builds one decode step over a random paged cache (shuffled block table, ragged lengths);
``fp64_reference`` evaluates the contract (docs/contract.md) in fp64, independently of every backend;
``check_against_reference`` checks a backend's output and caches against it with the contract's tolerances.
"""

import itertools
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .paged import context_indices, default_slot_mapping, default_varlen_slot_mapping
from .rope import rope_cos_sin

__all__ = ["Case", "make_case", "fp64_reference", "check_against_reference", "assert_same_bytes", "TOLERANCES",
           "ISAS", "cpu_supports"]

# The contract's tolerances (docs/contract.md, section 4): every backend vs the fp64 reference.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=0.0),
    torch.float16: dict(atol=2e-2, rtol=5e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=5e-3),
    # fp8 caches: the output within 2e-2 of the reference on the dequantized cache (section 7).
    torch.float8_e4m3fn: dict(atol=2e-2, rtol=5e-3),
    torch.float8_e5m2: dict(atol=2e-2, rtol=5e-3),
}


@dataclass
class Case:
    """Arguments of one fa_fused call (or, with ``query_start_loc``, one fa_fused_varlen call), plus what the
    tests need to check the caches. ``written_rows``: the rows of q / the output whose token is written."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_norm_weight: torch.Tensor
    k_norm_weight: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    positions: Optional[torch.Tensor] = None
    slot_mapping: Optional[torch.Tensor] = None
    written_rows: list = field(default_factory=list)
    query_start_loc: Optional[torch.Tensor] = None
    k_scale: Optional[torch.Tensor] = None
    v_scale: Optional[torch.Tensor] = None

    @property
    def varlen(self) -> bool:
        return self.query_start_loc is not None

    def args(self) -> tuple:
        """The op's arguments in schema order (fa_fused's, or fa_fused_varlen's with query_start_loc)."""
        indices = (self.block_table, self.seq_lens) + ((self.query_start_loc,) if self.varlen else ())
        return (self.q, self.k, self.v, self.q_norm_weight, self.k_norm_weight, self.cos, self.sin,
                self.k_cache, self.v_cache) + indices + (self.positions, self.slot_mapping)

    def scales(self) -> dict:
        """The keyword arguments k_scale / v_scale, where set."""
        return {name: getattr(self, name) for name in ("k_scale", "v_scale") if getattr(self, name) is not None}

    def op(self):
        """``torch.ops.qwen.fa_fused`` or ``fa_fused_varlen``, whichever takes ``args()``."""
        return torch.ops.qwen.fa_fused_varlen if self.varlen else torch.ops.qwen.fa_fused

    def run_op(self, **kwargs):
        """The op on this case itself (in place), with its scales."""
        return self.op()(*self.args(), **self.scales(), **kwargs)

    def clone(self) -> "Case":
        cloned = {name: (value.clone() if isinstance(value, torch.Tensor) else value)
                  for name, value in self.__dict__.items()}
        return Case(**cloned)

    def slots(self) -> torch.Tensor:
        """The flat slot each new token goes to (-1: none)."""
        if self.slot_mapping is not None:
            return self.slot_mapping.long()
        if self.varlen:
            return default_varlen_slot_mapping(self.block_table, self.seq_lens, self.query_start_loc,
                                               self.k_cache.shape[1])
        return default_slot_mapping(self.block_table, self.seq_lens, self.k_cache.shape[1])

    def context_indices(self) -> list:
        """Per new token, its context index: seq_lens[b] - n_b + i for row b's i-th of n_b new tokens."""
        starts = self.query_start_loc if self.varlen else torch.arange(len(self.seq_lens) + 1)
        return context_indices(self.seq_lens, starts).tolist()


def make_case(seq_lens, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32,
              cache_dtype=None, positions_offset: Optional[int] = 3, explicit_slots=False, skip_rows=(),
              extra_blocks=3, max_position=None, seed=0, new_tokens=None) -> Case:
    """A decode step over ragged ``seq_lens`` with a shuffled block table.

    Blocks past a row's context are -1 in the table, so a kernel that reads them fails loudly.
    ``positions_offset`` shifts RoPE positions away from the context indices (None: default positions);
    ``skip_rows`` (rows of q: tokens) get slot -1 (implies explicit slots). ``new_tokens`` (a count per row):
    an fa_fused_varlen call whose row b has that many new tokens, the last of its seq_lens[b].
    """
    generator = torch.Generator().manual_seed(seed)
    cache_dtype = cache_dtype or dtype
    batch = len(seq_lens)
    blocks_per_row = [math.ceil(n / block_size) for n in seq_lens]
    max_blocks = max(blocks_per_row) + 1
    num_blocks = sum(blocks_per_row) + extra_blocks
    order = torch.randperm(num_blocks, generator=generator)
    block_table = torch.full((batch, max_blocks), -1, dtype=torch.int32)
    taken = 0
    for row, count in enumerate(blocks_per_row):
        block_table[row, :count] = order[taken:taken + count].int()
        taken += count

    def randn(*shape, dtype=dtype):
        return torch.randn(*shape, generator=generator).to(dtype)

    lens = torch.tensor(seq_lens, dtype=torch.int32)
    query_start_loc = None
    if new_tokens is not None:
        query_start_loc = torch.tensor([0] + list(itertools.accumulate(new_tokens)), dtype=torch.int32)
    tokens = batch if new_tokens is None else sum(new_tokens)
    max_position = max_position or int(max(seq_lens)) + (positions_offset or 0) + 8
    cos, sin = rope_cos_sin(max_position, head_dim, rope_theta=1e6)
    case = Case(
        q=randn(tokens, num_heads, head_dim),
        k=randn(tokens, num_kv_heads, head_dim),
        v=randn(tokens, num_kv_heads, head_dim),
        q_norm_weight=torch.rand(head_dim, generator=generator) + 0.5,
        k_norm_weight=torch.rand(head_dim, generator=generator) + 0.5,
        cos=cos,
        sin=sin,
        k_cache=randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=cache_dtype),
        v_cache=randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=cache_dtype),
        block_table=block_table,
        seq_lens=lens,
        query_start_loc=query_start_loc,
    )
    if positions_offset is not None:
        shift = torch.randint(0, positions_offset + 1, (tokens,), generator=generator)
        case.positions = torch.tensor(case.context_indices(), dtype=torch.long) + shift
    if explicit_slots or skip_rows:
        slots = case.slots()
        for row in skip_rows:
            slots[row] = -1
        case.slot_mapping = slots
    case.written_rows = [row for row in range(tokens) if row not in skip_rows]
    return case


def assert_same_bytes(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.equal(actual.view(torch.uint8), expected.view(torch.uint8))


def fp64_reference(case: Case, eps: float = 1e-6, scale: Optional[float] = None):
    """Sections 1 and 4 of docs/contract.md in fp64, written from the contract (not from the eager fallback,
    whose own fp32 error grows with the logits). Returns (out [T, Hq, D] fp64, k_cache, v_cache after the
    writes); T = B for fa_fused.

    Per new token: RMSNorm and rotate-half RoPE of q and k; k and v rounded once to the cache dtype and
    written to the token's slot (all of them first); then softmax(q . k_t * scale) over the cached tokens
    it sees, which include itself as stored: the first c + 1 of its row, c its context index (section 8).
    """
    head_dim = case.q.shape[-1]
    half = head_dim // 2
    scale = head_dim ** -0.5 if scale is None else scale
    context = case.context_indices()
    positions = case.positions if case.positions is not None else torch.tensor(context, dtype=torch.long)

    def norm_and_rope(x, weight):
        x = x.double()
        x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
        cos = case.cos[positions.long()].double().unsqueeze(1)
        sin = case.sin[positions.long()].double().unsqueeze(1)
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    q = norm_and_rope(case.q, case.q_norm_weight)
    k = norm_and_rope(case.k, case.k_norm_weight)
    k_scale = float(case.k_scale) if case.k_scale is not None else 1.0
    v_scale = float(case.v_scale) if case.v_scale is not None else 1.0

    def stored(x, scale, dtype):
        """Section 7: x / scale, saturated for fp8, rounded once to the cache dtype."""
        x = x / scale
        if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            x = x.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max)
        return x.to(dtype)

    k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    flat_k = k_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    flat_v = v_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    for token, slot in enumerate(case.slots().tolist()):
        if slot >= 0:
            flat_k[slot] = stored(k[token], k_scale, k_cache.dtype)
            flat_v[slot] = stored(case.v[token].double(), v_scale, v_cache.dtype)
    group = q.shape[1] // num_kv_heads
    out = torch.empty(q.shape, dtype=torch.float64)
    rows = torch.arange(len(case.seq_lens)).repeat_interleave(
        case.query_start_loc.diff().long() if case.varlen else torch.ones(len(case.seq_lens), dtype=torch.long))
    for token, (row, index) in enumerate(zip(rows.tolist(), context)):
        seen = torch.arange(index + 1)
        slots = case.block_table[row, seen // block_size].long() * block_size + seen % block_size
        keys = flat_k[slots].double().repeat_interleave(group, dim=1) * k_scale      # [c + 1, Hq, D]
        values = flat_v[slots].double().repeat_interleave(group, dim=1) * v_scale
        weights = torch.softmax(torch.einsum("hd,thd->ht", q[token], keys) * scale, dim=-1)
        out[token] = torch.einsum("ht,thd->hd", weights, values)
    return out, k_cache, v_cache


def check_against_reference(result_case: Case, result_out: torch.Tensor, original: Case, eps: float = 1e-6,
                            scale: Optional[float] = None) -> dict:
    """The output of written rows and the whole caches against ``fp64_reference(original)``: the new slots
    agree within the contract's tolerance (section 4), every other byte is untouched; NaN/Inf must sit where
    the reference has them. Returns the max abs errors over the finite values."""
    expected_out, expected_k, expected_v = fp64_reference(original, eps, scale)
    # A low-precision cache bounds the output's precision too, whatever q's dtype.
    low_precision = result_out.dtype if result_out.dtype != torch.float32 else result_case.k_cache.dtype
    tol = TOLERANCES[low_precision]
    rows = result_case.written_rows
    expected_rows = expected_out[rows].to(result_out.dtype).double()
    torch.testing.assert_close(result_out[rows].double(), expected_rows, equal_nan=True, **tol)
    slots = original.slots()[rows]
    slots = slots[slots >= 0]

    def max_error(actual, expected):
        finite = torch.isfinite(actual) & torch.isfinite(expected)
        return (actual[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0

    errors = {"out": max_error(result_out[rows].double(), expected_rows)}
    for name, expected in (("k_cache", expected_k), ("v_cache", expected_v)):
        flat_result = getattr(result_case, name).flatten(0, 1)
        flat_expected = expected.flatten(0, 1)
        flat_original = getattr(original, name).flatten(0, 1)
        # Cache values scale with the norm weights: fp32 gets a relative bound too. An fp8 value rounded from fp32
        # instead of fp64 may land one step away where the two sit either side of a rounding boundary.
        if flat_result.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            finfo = torch.finfo(flat_result.dtype)
            cache_tol = dict(atol=finfo.smallest_normal, rtol=finfo.eps)
        else:
            cache_tol = TOLERANCES[flat_result.dtype] | ({"rtol": 1e-6} if flat_result.dtype == torch.float32 else {})
        torch.testing.assert_close(flat_result[slots].double(), flat_expected[slots].double(), equal_nan=True,
                                   **cache_tol)
        if slots.numel():
            assert not torch.equal(flat_result[slots], flat_original[slots]), f"{name}: new slots not written"
        untouched = torch.ones(flat_result.shape[0], dtype=torch.bool)
        untouched[slots] = False
        assert_same_bytes(flat_result[untouched], flat_original[untouched])
        errors[name] = max_error(flat_result[slots].double(), flat_expected[slots].double())
    return errors


def cpu_supports(isa: str) -> bool:
    """Whether this CPU can run the attention kernel built for ``isa`` (the op refuses a forced one it can't)."""
    flags = open("/proc/cpuinfo").read().split()
    needed = {"generic": [], "avx2": ["avx2", "fma"], "avx512": ["avx512f", "avx512bw", "avx512vl", "avx512dq"]}
    return all(flag in flags for flag in needed[isa])


ISAS = ["generic", "avx2", "avx512"]
