"""``fa_fused_varlen``: several new tokens per row (docs/contract.md, section 8), against the fp64 reference.

Row b's n_b new tokens are the last of its seq_lens[b]-token context; new token i attends causally up to its own
context index. Covered: ragged counts (1..16, rows of one token, a count equal to the row's seq_len, rows with no
new token), every ISA the CPU runs, the KV split on and off, the one-token case against fa_fused, the argument
checks of query_start_loc, hidden tokens never read, compile, opcheck and hypothesis.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import torch_qwen_fused
from conftest import check_backends, run_backend
from torch_qwen_fused.testing import ISAS, assert_same_bytes, check_against_reference, cpu_supports, make_case

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# (seq_lens, new tokens per row): verification of 1..16 drafts, rows of one token, a row that is all new
# (a first prefill chunk), a row with no new token, block and tile boundaries.
RAGGED = [
    ([40, 5, 300, 16], [4, 5, 1, 16]),
    ([1, 33, 129, 64], [1, 8, 16, 0]),
    ([17, 200], [17, 2]),
]


@pytest.mark.parametrize("layout", [(8, 2), (9, 3), (40, 8)], ids=lambda layout: f"{layout[0]}x{layout[1]}")
@pytest.mark.parametrize("block_size", [1, 16, 128])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens_and_counts", RAGGED, ids=["drafts", "ones-and-sixteen", "whole-row"])
def test_matches_fp64_reference(fresh_env, lens_and_counts, dtype, block_size, layout):
    seq_lens, counts = lens_and_counts
    case = make_case(seq_lens, *layout, 64, block_size, dtype, new_tokens=counts, seed=block_size)
    check_backends(case)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("chunk", [None, "32", "100"])
def test_every_instruction_set_with_the_kv_split_on_and_off(fresh_env, isa, chunk):
    if not cpu_supports(isa):
        pytest.skip(f"this CPU cannot run the {isa} kernel")
    fresh_env.setenv("TORCH_QWEN_FUSED_CPU_ISA", isa)
    if chunk:
        fresh_env.setenv("TORCH_QWEN_FUSED_KV_CHUNK", chunk)
    case = make_case([300, 70, 9], 40, 8, 128, 16, torch.bfloat16, new_tokens=[8, 3, 9], skip_rows=(4,))
    check_backends(case, backends=("cpu",))


def test_one_token_per_row_is_exactly_fa_fused(fresh_env):
    case = make_case([5, 60, 130], 10, 2, 64, 16, torch.bfloat16, skip_rows=(1,))
    fused_case, fused = case.clone(), None
    fused = torch.ops.qwen.fa_fused(*fused_case.args())
    varlen_case = case.clone()
    varlen_case.query_start_loc = torch.arange(4, dtype=torch.int32)
    varlen = torch.ops.qwen.fa_fused_varlen(*varlen_case.args())
    assert torch.equal(varlen, fused)
    assert torch.equal(varlen_case.k_cache, fused_case.k_cache) and torch.equal(varlen_case.v_cache, fused_case.v_cache)


def test_a_new_token_never_reads_later_ones(fresh_env):
    """Causality as the kernel does it: a NaN in the last new token's k and v reaches that token only."""
    case = make_case([50, 20], 8, 2, 64, 16, torch.float32, new_tokens=[6, 3])
    case.k[5, 0, 3] = float("nan")
    case.v[5, 1, 7] = float("inf")
    for backend in ("cpu", "eager"):
        result_case, out = run_backend(case, backend)
        check_against_reference(result_case, out, case)
        assert torch.isfinite(out[:5]).all() and torch.isfinite(out[6:]).all()
        assert not torch.isfinite(out[5]).all()


@pytest.mark.parametrize("backend", ["cpu", "eager"])
def test_rows_without_new_tokens_and_an_empty_call(fresh_env, backend):
    case = make_case([10, 30, 4], 8, 2, 64, 16, torch.float32, new_tokens=[0, 3, 0])
    check_backends(case, backends=(backend,))
    empty = make_case([10, 4], 8, 2, 64, 16, torch.float32, new_tokens=[0, 0])
    before = empty.clone()
    _, out = run_backend(empty, backend)
    assert out.shape == (0, 8, 64)
    assert torch.equal(empty.k_cache, before.k_cache) and torch.equal(empty.v_cache, before.v_cache)


def test_writes_bump_versions_and_inputs_that_require_grad_are_refused(fresh_env):
    case = make_case([12, 7], 8, 2, 64, 16, torch.float32, new_tokens=[3, 2])
    before = case.k_cache._version, case.v_cache._version
    torch.ops.qwen.fa_fused_varlen(*case.args())
    assert case.k_cache._version > before[0] and case.v_cache._version > before[1]
    case.q.requires_grad_()
    k_before = case.k_cache.clone()
    with pytest.raises(RuntimeError, match="fa_fused_varlen: q requires grad, but fa_fused_varlen is inference-only"):
        torch.ops.qwen.fa_fused_varlen(*case.args())
    assert torch.equal(case.k_cache, k_before)


def base_case():
    return make_case([20, 33], 8, 2, 64, 16, torch.bfloat16, new_tokens=[3, 4], explicit_slots=True)


def set_starts(values):
    def mutate(case):
        case.query_start_loc = torch.tensor(values, dtype=torch.int32)
    return mutate


BAD_INPUTS = {
    "query_start_loc shape": (set_starts([0, 3]), "query_start_loc must have shape [3] (batch + 1), got [2]"),
    "query_start_loc dtype": (lambda c: setattr(c, "query_start_loc", c.query_start_loc.long()),
                              "query_start_loc must be int32, got torch.int64"),
    "query_start_loc from 1": (set_starts([1, 3, 7]), "query_start_loc[0] must be 0, got 1"),
    "query_start_loc decreasing": (set_starts([0, 5, 4]),
                                   "query_start_loc must be non-decreasing, but query_start_loc[2] = 4 < "
                                   "query_start_loc[1] = 5"),
    "more new tokens than seq_len": (lambda c: c.seq_lens.__setitem__(0, 2),
                                     "row 0 has 3 new tokens (query_start_loc[1] - query_start_loc[0]) but "
                                     "seq_lens[0] = 2"),
    "query_start_loc short of the tokens": (set_starts([0, 3, 6]),
                                            "query_start_loc[2] = 6 must equal the number of tokens q.shape[0] = 7"),
    "positions per token": (lambda c: setattr(c, "positions", c.positions[:2]), "positions must have shape [7]"),
    "two tokens write one slot": (lambda c: c.slot_mapping.__setitem__(5, int(c.slot_mapping[1])),
                                  "slot_mapping[5] = "),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_refused_before_any_write(name):
    mutate, expected = BAD_INPUTS[name]
    messages = {}
    for backend in ("cpu", "eager"):
        case = base_case()
        mutate(case)
        k_before, v_before = case.k_cache.clone(), case.v_cache.clone()
        with pytest.raises(ValueError) as error:
            torch_qwen_fused.fa_fused_varlen(*case.args(), backend=backend)
        messages[backend] = str(error.value).splitlines()[0]
        assert messages[backend].startswith("fa_fused_varlen: ") and expected in messages[backend], messages
        assert_same_bytes(case.k_cache, k_before)
        assert_same_bytes(case.v_cache, v_before)
    assert len(set(messages.values())) == 1, messages


def test_pypto_backend_refuses_clearly():
    with pytest.raises(ValueError, match="the pypto kernel takes one new token per row"):
        torch_qwen_fused.fa_fused_varlen(*base_case().args(), backend="pypto")


def verify_step(*args):
    return torch.ops.qwen.fa_fused_varlen(*args) + 1.0


def test_torch_compile_fullgraph_matches_eager_without_recompiles(fresh_env):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(verify_step, backend=counter, fullgraph=True, dynamic=True)
    # B, T and the table sizes are chosen not to coincide with each other or the head sizes (dynamo's duck
    # sizing would otherwise tie them, as in any user's graph).
    for lens, counts in [([40, 9, 12], [4, 3, 2]), ([70, 33, 5, 21, 9], [5, 1, 2, 3, 1])]:
        case = make_case(lens, 12, 2, 64, 16, torch.float32, new_tokens=counts, explicit_slots=True)
        compiled_case, eager_case = case.clone(), case.clone()
        torch.testing.assert_close(compiled(*compiled_case.args()), verify_step(*eager_case.args()), atol=1e-6, rtol=0)
        assert torch.equal(compiled_case.k_cache, eager_case.k_cache)
    assert counter.frame_count == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(fresh_env, dtype):
    case = make_case([20, 3], 10, 2, 64, 4, dtype, new_tokens=[4, 3], skip_rows=(6,))
    torch.library.opcheck(torch.ops.qwen.fa_fused_varlen.default, case.args(), {"eps": 1e-6, "scale": None})


@settings(max_examples=40, deadline=None)
@given(data=st.data(), num_kv_heads=st.integers(1, 3), group=st.integers(1, 6),
       head_dim=st.sampled_from([16, 64, 128]), block_size=st.integers(1, 40), dtype=st.sampled_from(DTYPES))
def test_property_random_counts(data, num_kv_heads, group, head_dim, block_size, dtype):
    seq_lens = data.draw(st.lists(st.integers(1, 150), min_size=1, max_size=4), label="seq_lens")
    counts = [data.draw(st.integers(0, min(16, n)), label="new tokens") for n in seq_lens]
    case = make_case(seq_lens, num_kv_heads * group, num_kv_heads, head_dim, block_size, dtype, new_tokens=counts,
                     seed=data.draw(st.integers(0, 2**16), label="seed"))
    check_backends(case)
