"""The op under hostile and unusual input (docs/contract.md, sections 4 and 5): non-finite values, extreme finite
values and contexts, aliasing, odd strides, another thread changing torch's thread count.

The rule for non-finite values is torch's: a NaN or Inf that a row reads gives the outputs the fp64
reference (and the eager fallback) give, on every ISA the CPU runs. The x86 kernels used to turn a NaN
score into exp(88) and hand that token all the softmax weight.
"""

import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import torch_qwen_fused
from conftest import run_backend
from torch_qwen_fused.testing import ISAS, assert_same_bytes, check_against_reference, cpu_supports, make_case

RUNNABLE_ISAS = [isa for isa in ISAS if cpu_supports(isa)]
NON_FINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def poison(case, target: str, value: float) -> None:
    """Puts ``value`` into one element that row 0 reads (``target`` names the input)."""
    if target in ("q", "k", "v"):
        getattr(case, target)[0, 0, 5] = value
    elif target in ("q_norm_weight", "k_norm_weight"):
        getattr(case, target)[5] = value
    elif target in ("cached_key", "cached_value"):   # row 0's first token (the new one if seq_len is 1)
        cache = case.k_cache if target == "cached_key" else case.v_cache
        cache[int(case.block_table[0, 0]), 0, 0, 5] = value
    else:
        raise ValueError(target)


def run_on_isa(monkeypatch, case, isa):
    """The op on ``case`` itself (no copy: aliasing and strides are kept), with the kernel built for ``isa``."""
    monkeypatch.setenv("TORCH_QWEN_FUSED_CPU_ISA", isa)
    try:
        return case, torch.ops.qwen.fa_fused(*case.args())
    finally:
        monkeypatch.delenv("TORCH_QWEN_FUSED_CPU_ISA")


@pytest.mark.parametrize("value", list(NON_FINITE))
@pytest.mark.parametrize("target", ["q", "k", "v", "q_norm_weight", "k_norm_weight", "cached_key", "cached_value"])
@pytest.mark.parametrize("isa", ISAS)
def test_non_finite_input_gives_the_reference_pattern(fresh_env, isa, target, value):
    if not cpu_supports(isa):
        pytest.skip(f"this CPU cannot run the {isa} kernel")
    # Row 0 spans two KV chunks of 64 tokens (the merge sees a non-finite partial); row 1 stays finite.
    case = make_case([150, 40], 10, 2, 64, 16, torch.float32)
    poison(case, target, NON_FINITE[value])
    fresh_env.setenv("TORCH_QWEN_FUSED_KV_CHUNK", "64")
    result_case, out = run_on_isa(fresh_env, case.clone(), isa)
    check_against_reference(result_case, out, case)
    _, eager_out = run_backend(case, "eager")
    assert torch.equal(out.isnan(), eager_out.isnan()) and torch.equal(out.isinf(), eager_out.isinf())
    if target not in ("q_norm_weight", "k_norm_weight"):   # the weights are every row's
        assert torch.isfinite(out[1]).all()
    if value == "nan" and target != "cached_value":
        assert out[0].isnan().any(), "a NaN score must not come out finite"


@pytest.mark.parametrize("isa", ISAS)
def test_fp16_cache_overflow_on_write_is_inf_as_in_torch(fresh_env, isa):
    if not cpu_supports(isa):
        pytest.skip(f"this CPU cannot run the {isa} kernel")
    case = make_case([30, 7], 8, 2, 64, 16, torch.float32, cache_dtype=torch.float16)
    case.k_norm_weight[3] = 1e6                     # the roped key exceeds fp16's 65504
    result_case, out = run_on_isa(fresh_env, case.clone(), isa)
    written = result_case.k_cache.flatten(0, 1)[case.slots()]
    assert written.isinf().any()
    check_against_reference(result_case, out, case)


# ---------------------------------------------------------------------------------------------- fuzz
ALIASING = ["none", "k_cache is v_cache", "q inside k_cache", "k inside v_cache", "duplicate slot"]


def make_ambiguous(case, kind: str) -> None:
    if kind == "k_cache is v_cache":
        case.v_cache = case.k_cache
    elif kind == "q inside k_cache":
        case.q = case.k_cache.view(-1)[: case.q.numel()].view(case.q.shape)
    elif kind == "k inside v_cache":
        case.k = case.v_cache.view(-1)[-case.k.numel():].view(case.k.shape)
    elif kind == "duplicate slot":
        slots = case.slots()
        slots[-1] = slots[0]
        case.slot_mapping = slots


def make_strided(case) -> None:
    """The same values through views: cos/sin columns of a wider table, q/k/v with padded last dims, a
    block table that is the transpose of a contiguous one."""
    head_dim = case.q.shape[-1]
    for name in ("cos", "sin", "q", "k", "v"):
        tensor = getattr(case, name)
        setattr(case, name, torch.cat((tensor, torch.full_like(tensor, float("nan"))), dim=-1)[..., :head_dim])
    case.block_table = case.block_table.t().contiguous().t()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(),
       layout=st.sampled_from([(4, 4), (9, 3), (8, 2), (6, 1)]),
       head_dim=st.sampled_from([16, 64, 128]),
       block_size=st.sampled_from([1, 5, 16]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       aliasing=st.sampled_from(ALIASING),
       strided=st.booleans())
def test_fuzz_non_finite_aliasing_and_strides(fresh_env, data, layout, head_dim, block_size, dtype, aliasing,
                                              strided):
    seq_lens = data.draw(st.lists(st.integers(1, 90), min_size=2, max_size=4), label="seq_lens")
    case = make_case(seq_lens, *layout, head_dim, block_size, dtype, explicit_slots=True,
                     seed=data.draw(st.integers(0, 2**16), label="seed"))
    poisoned = data.draw(st.lists(st.tuples(
        st.sampled_from(["q", "k", "v", "q_norm_weight", "k_norm_weight", "cached_key", "cached_value"]),
        st.sampled_from(list(NON_FINITE))), max_size=2), label="poisoned")
    for target, value in poisoned:
        poison(case, target, NON_FINITE[value])
    chunk = data.draw(st.sampled_from([None, "32"]), label="kv chunk")
    if chunk:
        fresh_env.setenv("TORCH_QWEN_FUSED_KV_CHUNK", chunk)

    if aliasing != "none":
        assume(case.k_cache.numel() >= case.q.numel())     # room for q inside the cache
        make_ambiguous(case, aliasing)
        messages = set()
        for backend in RUNNABLE_ISAS + ["eager"]:
            working = case.clone()          # clone() gives every tensor its own memory: alias again
            make_ambiguous(working, aliasing)
            k_before, v_before = working.k_cache.clone(), working.v_cache.clone()
            with pytest.raises(ValueError) as error:
                if backend == "eager":
                    torch_qwen_fused.fa_fused(*working.args(), backend="eager")
                else:
                    run_on_isa(fresh_env, working, backend)
            messages.add(str(error.value).splitlines()[0])
            assert_same_bytes(working.k_cache, k_before)
            assert_same_bytes(working.v_cache, v_before)
        assert len(messages) == 1, messages
        return

    eager_case, eager_out = run_backend(case, "eager")
    check_against_reference(eager_case, eager_out, case)
    for isa in RUNNABLE_ISAS:
        working = case.clone()
        if strided:
            make_strided(working)
        result_case, out = run_on_isa(fresh_env, working, isa)
        check_against_reference(result_case, out, case)
        rows = case.written_rows
        assert torch.equal(out[rows].isnan(), eager_out[rows].isnan()), isa
        assert torch.equal(out[rows].isinf(), eager_out[rows].isinf()), isa


# ------------------------------------------------------------------------------- extreme but finite values
def scored_case(num_tokens: int = 40, head_dim: int = 16):
    """One row whose cached keys score 95 (default scale), but token 7's, which scores 0: its softmax weight is
    about e^-95 / num_tokens, a subnormal fp32. At position 0 RoPE is the identity and q = ones normalizes to
    ones (up to eps), so q . k = sum(k)."""
    case = make_case([num_tokens], 1, 1, head_dim, 16, torch.float32, positions_offset=None)
    case.positions = torch.zeros(1, dtype=torch.long)
    case.q.fill_(1.0)
    case.q_norm_weight.fill_(1.0)
    case.k.fill_(1.0)
    case.k_norm_weight.fill_(1.0)
    case.k_cache.fill_(95.0 / head_dim ** 0.5)
    token_7 = (int(case.block_table[0, 0]), 7)
    case.k_cache[token_7].zero_()
    return case, token_7


@pytest.mark.parametrize("kv_chunk", [None, "16"])
@pytest.mark.parametrize("isa", ISAS)
def test_inf_value_with_a_subnormal_weight_is_inf(fresh_env, isa, kv_chunk):
    """A weight of ~e^-99 times a V of +Inf is +Inf in torch; the vectorized exp used to return 0 below e^-87.3
    and give 0 * Inf = NaN."""
    if not cpu_supports(isa):
        pytest.skip(f"this CPU cannot run the {isa} kernel")
    case, token_7 = scored_case()
    case.v_cache[token_7][0, 3] = float("inf")
    if kv_chunk:
        fresh_env.setenv("TORCH_QWEN_FUSED_KV_CHUNK", kv_chunk)
    result_case, out = run_on_isa(fresh_env, case.clone(), isa)
    _, eager_out = run_backend(case, "eager")
    assert eager_out[0, 0, 3] == float("inf")
    assert out[0, 0, 3] == float("inf"), f"{isa}: {out[0, 0, 3]}"
    assert torch.equal(out.isnan(), eager_out.isnan()) and torch.equal(out.isinf(), eager_out.isinf())
    check_against_reference(result_case, out, case)


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("isa", ISAS)
def test_finite_values_never_give_an_infinite_output(fresh_env, isa, varlen):
    """Every V = 3e38: the output is a convex combination of them, 3e38 (eager's), not an overflowed sum."""
    if not cpu_supports(isa):
        pytest.skip(f"this CPU cannot run the {isa} kernel")
    case = make_case([300, 90], 8, 2, 64, 16, torch.float32, new_tokens=[3, 1] if varlen else None)
    case.v_cache.fill_(3e38)
    case.v.fill_(3e38)
    fresh_env.setenv("TORCH_QWEN_FUSED_CPU_ISA", isa)
    out = case.clone().run_op()
    _, eager_out = run_backend(case, "eager")
    assert torch.isfinite(eager_out).all()
    assert torch.isfinite(out).all(), f"{isa}: {out.isinf().sum()} infinite outputs"
    torch.testing.assert_close(out / 3e38, torch.ones_like(out), atol=0, rtol=1e-5)


def test_equal_values_over_a_2_to_25_token_context(fresh_env):
    """One row of 2^25 tokens whose V rows are all 1.5 and whose weights are all 1 (q = 0): the output is 1.5.
    With the KV chunk forced to the whole row, the kernel used to sum 2^25 unit weights in fp32 (exact only to
    2^24) and returned 1.0; chunks are now at most 2^20 tokens. Block 0 serves every logical block."""
    length, block_size, head_dim = 2 ** 25, 2 ** 16, 16
    cos, sin = torch_qwen_fused.rope_cos_sin(8, head_dim)
    weight = torch.ones(head_dim)
    v_cache = torch.full((1, block_size, 1, head_dim), 1.5)
    fresh_env.setenv("TORCH_QWEN_FUSED_KV_CHUNK", str(length))
    out = torch.ops.qwen.fa_fused(
        torch.zeros(1, 1, head_dim), torch.randn(1, 1, head_dim), torch.full((1, 1, head_dim), 1.5), weight, weight,
        cos, sin, torch.randn(1, block_size, 1, head_dim), v_cache,
        torch.zeros(1, length // block_size, dtype=torch.int32), torch.tensor([length], dtype=torch.int32),
        torch.tensor([3]))
    torch.testing.assert_close(out, torch.full_like(out, 1.5), atol=0, rtol=1e-6)


# ------------------------------------------------------------------------------------ concurrency
RACE_SCRIPT = """
import threading, torch, torch_qwen_fused
from torch_qwen_fused.testing import make_case
case = make_case([3000], 16, 4, 128, 16, torch.float32, positions_offset=None)
expected = case.clone().run_op()
stop, outputs = threading.Event(), []
def toggle_threads():
    count = 1
    while not stop.is_set():
        torch.set_num_threads(count)
        count = 3 - count
def decode():
    with torch.no_grad():
        outputs.extend(case.clone().run_op() for _ in range(CALLS))
toggler, worker = threading.Thread(target=toggle_threads), threading.Thread(target=decode)
toggler.start(); worker.start(); worker.join(); stop.set(); toggler.join()
assert len(outputs) == CALLS and all(torch.allclose(out, expected, atol=1e-5, rtol=0) for out in outputs)
print("ok")
"""


def test_another_thread_changing_the_thread_count_never_corrupts_the_heap():
    """torch.set_num_threads(1 <-> 2) in one thread while another decodes: the kernel's per-thread scratch was
    sized from one thread count and indexed by another (glibc aborted with "free(): invalid next size"). A child
    process, so that an abort fails this test instead of the run."""
    result = subprocess.run([sys.executable, "-c", RACE_SCRIPT.replace("CALLS", "60")], capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
