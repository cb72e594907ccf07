"""The op and its Python API: the fused CPU kernel and the eager fallback against the fp64 reference of the
contract (torch_qwen_fused.testing.fp64_reference) and independent references (HF Qwen3's own norm and RoPE, SDPA)."""

import threading


import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import torch_qwen_fused
from conftest import check_backends, record_errors, run_backend
from torch_qwen_fused.testing import TOLERANCES, check_against_reference, cpu_supports, make_case

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCK_SIZES = [1, 16, 48, 128]
# (num_heads, num_kv_heads): MHA, GQA 5 (Qwen3-14B 40/8), GQA 8, and vLLM's odd ones (9/3, 12/4 -> group 3).
HEAD_LAYOUTS = [(4, 4), (10, 2), (40, 8), (16, 2), (9, 3), (12, 4)]
HEAD_DIMS = [64, 128]


def ragged_lens(block_size):
    """1, a full block, one past it, and more than 4 blocks."""
    return [1, block_size, block_size + 1, 4 * block_size + 3]


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("num_heads,num_kv_heads", HEAD_LAYOUTS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_fp64_reference(fresh_env, dtype, block_size, num_heads, num_kv_heads, head_dim):
    case = make_case(ragged_lens(block_size), num_heads, num_kv_heads, head_dim, block_size, dtype,
                     skip_rows=(2,), seed=block_size + head_dim)
    check_backends(case)


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_instruction_set(fresh_env, isa, dtype):
    fresh_env.setenv("TORCH_QWEN_FUSED_CPU_ISA", isa)
    case = make_case([1, 33, 200, 77], 40, 8, 128, 16, dtype, skip_rows=(1,))
    if not cpu_supports(isa):
        with pytest.raises(RuntimeError, match=f"TORCH_QWEN_FUSED_CPU_ISA={isa} but this CPU lacks"):
            run_backend(case, "cpu")
        pytest.skip(f"this CPU cannot run the {isa} kernel (the refusal was checked)")
    check_backends(case, backends=("cpu",))


def test_unknown_instruction_set_is_refused_before_any_write(fresh_env):
    fresh_env.setenv("TORCH_QWEN_FUSED_CPU_ISA", "sse9")
    case = make_case([5, 9])
    before = case.clone()
    with pytest.raises(RuntimeError, match="must be generic, avx2 or avx512"):
        torch.ops.qwen.fa_fused(*case.args())
    assert torch.equal(case.k_cache, before.k_cache) and torch.equal(case.v_cache, before.v_cache)


CACHE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_attention_path_names_the_kernel_that_reads_the_cache(fresh_env, isa, cache_dtype):
    """A forced ISA is the widest kernel a call may take: the kernels say which cache dtypes they read, and one
    that cannot read a dtype (AVX-512 and fp8 today) hands it to the next narrower one, never to a wider one."""
    if not cpu_supports(isa):
        pytest.skip(f"this CPU cannot run the {isa} kernel")
    fresh_env.setenv("TORCH_QWEN_FUSED_CPU_ISA", isa)
    path = torch_qwen_fused.cpu_attention_path(cache_dtype)
    taken = path.split(":")[0]
    narrower_or_same = ["avx512", "avx2", "generic"][["avx512", "avx2", "generic"].index(isa):]
    assert taken in narrower_or_same, path
    if cache_dtype.itemsize > 1:
        assert taken == isa, path
    assert ("pairs" in path) == (taken == "avx2" and cache_dtype == torch.bfloat16), path


def test_attention_path_refuses_a_dtype_no_cache_has():
    with pytest.raises(ValueError, match="cache_dtype must be float32, float16, bfloat16, float8_e4m3fn or"):
        torch_qwen_fused.cpu_attention_path(torch.int8)


@pytest.mark.parametrize("chunk_tokens", [None, "1", "32", "100", "1000000"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_split_on_and_off(fresh_env, chunk_tokens, dtype):
    if chunk_tokens is not None:
        fresh_env.setenv("TORCH_QWEN_FUSED_KV_CHUNK", chunk_tokens)
    case = make_case([3000, 1, 700], 16, 2, 128, 64, dtype, explicit_slots=True)
    check_backends(case, backends=("cpu",))


def test_batch_of_one_long_context_splits_and_matches(fresh_env):
    case = make_case([5000], 40, 8, 128, 128, torch.bfloat16)
    check_backends(case)


def test_a_7000_token_row_next_to_short_ones(fresh_env):
    # Odd length (not a multiple of the tile, the chunk or the block), ragged neighbours, odd head layout.
    case = make_case([7001, 1, 130], 9, 3, 128, 16, torch.bfloat16, skip_rows=(1,))
    check_backends(case)


def test_default_positions_and_slots(fresh_env):
    case = make_case([1, 20, 64], 8, 2, 64, 16, torch.float32, positions_offset=None)
    assert case.positions is None and case.slot_mapping is None
    check_backends(case)


@pytest.mark.parametrize("scale,eps", [(0.5, 1e-6), (None, 1e-2)])
def test_scale_and_eps(fresh_env, scale, eps):
    case = make_case([9, 40], 8, 4, 64, 8, torch.float32)
    check_backends(case, scale=scale, eps=eps)


def test_cache_dtype_may_differ_from_q(fresh_env):
    case = make_case([7, 90], 8, 2, 64, 16, torch.float32, cache_dtype=torch.bfloat16)
    check_backends(case)


def test_peaked_softmax_stays_finite(fresh_env):
    case = make_case([1, 300], 8, 2, 64, 16, torch.float32)
    case.q_norm_weight *= 40.0
    case.k_norm_weight *= 40.0
    out = check_backends(case)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", ["cpu", "eager"])
def test_garbage_past_the_context_is_never_read(fresh_env, backend):
    # Slots a row has not reached yet may hold NaN (a cache from torch.empty): they must not leak in.
    case = make_case([5, 20, 1], 8, 2, 64, 16, torch.float32)
    clean_case, clean_out = run_backend(case, backend)
    for row, seq_len in enumerate(case.seq_lens.tolist()):
        blocks = case.block_table[row, : -(-seq_len // 16)].long()
        for cache in (case.k_cache, case.v_cache):
            flat = cache.flatten(0, 1)
            row_slots = (blocks[:, None] * 16 + torch.arange(16)).flatten()
            flat[row_slots[seq_len:]] = float("nan")
    unused = torch.ones(case.k_cache.shape[0], dtype=torch.bool)
    unused[case.block_table[case.block_table >= 0].long()] = False
    case.k_cache[unused] = float("nan")
    case.v_cache[unused] = float("nan")
    _, out = run_backend(case, backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, clean_out, atol=0, rtol=0)


def test_seq_len_one_attends_only_to_itself(fresh_env):
    # With one token, softmax weight 1 goes to the new v: the output is v repeated over the group.
    case = make_case([1, 1], 10, 2, 64, 4, torch.float32)
    _, out = run_backend(case, "cpu")
    expected = case.v.repeat_interleave(5, dim=1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_matches_hf_qwen3_and_sdpa(fresh_env):
    """An independent reference: HF's Qwen3RMSNorm and apply_rotary_pos_emb, SDPA on a contiguous cache."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb

    num_heads, num_kv_heads, head_dim, block_size = 40, 8, 128, 16
    case = make_case([1, 17, 50], num_heads, num_kv_heads, head_dim, block_size, torch.float32)
    q_norm, k_norm = Qwen3RMSNorm(head_dim, eps=1e-6), Qwen3RMSNorm(head_dim, eps=1e-6)
    with torch.no_grad():
        q_norm.weight.copy_(case.q_norm_weight)
        k_norm.weight.copy_(case.k_norm_weight)
    positions = case.positions
    cos, sin = case.cos[positions].unsqueeze(1), case.sin[positions].unsqueeze(1)  # [B, 1, D]
    # HF layout [B, H, S=1, D]
    q, k = apply_rotary_pos_emb(q_norm(case.q).unsqueeze(2), k_norm(case.k).unsqueeze(2), cos, sin)
    expected = []
    for row, seq_len in enumerate(case.seq_lens.tolist()):
        blocks = case.block_table[row, : -(-seq_len // block_size)].long()
        past_k = case.k_cache[blocks].flatten(0, 1)[: seq_len - 1].permute(1, 0, 2)  # [Hkv, L-1, D]
        past_v = case.v_cache[blocks].flatten(0, 1)[: seq_len - 1].permute(1, 0, 2)
        keys = torch.cat([past_k, k[row, :, 0].unsqueeze(1)], dim=1)
        values = torch.cat([past_v, case.v[row].unsqueeze(1)], dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(q[row:row + 1], keys[None], values[None],
                                                               enable_gqa=True)
        expected.append(out[0, :, 0])
    expected = torch.stack(expected)
    for backend in ("cpu", "eager"):
        _, out = run_backend(case, backend)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_rope_tables_match_hf_rotary_embedding():
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    config = Qwen3Config(head_dim=128, hidden_size=256, num_attention_heads=2, rope_theta=1e6,
                         max_position_embeddings=512)
    rotary = Qwen3RotaryEmbedding(config)
    positions = torch.arange(512)[None]
    hf_cos, hf_sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = torch_qwen_fused.rope_cos_sin(512, 128, rope_theta=1e6)
    torch.testing.assert_close(cos, hf_cos[0], atol=0, rtol=0)
    torch.testing.assert_close(sin, hf_sin[0], atol=0, rtol=0)


@settings(max_examples=30, deadline=None)
@given(
    data=st.data(),
    num_kv_heads=st.integers(1, 4),
    group=st.integers(1, 9),
    head_dim=st.sampled_from([16, 32, 48, 64, 256]),
    block_size=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES),
)
def test_property_random_shapes(data, num_kv_heads, group, head_dim, block_size, dtype):
    seq_lens = data.draw(st.lists(st.integers(1, 150), min_size=1, max_size=4), label="seq_lens")
    skip = data.draw(st.sets(st.integers(0, len(seq_lens) - 1), max_size=len(seq_lens) - 1), label="skip")
    case = make_case(seq_lens, num_kv_heads * group, num_kv_heads, head_dim, block_size, dtype,
                     skip_rows=tuple(skip), seed=data.draw(st.integers(0, 2**16), label="seed"))
    check_backends(case)


def test_backends_agree_and_default_dispatch(fresh_env):
    case = make_case([5, 60], 8, 2, 64, 16, torch.bfloat16)
    _, via_op = case.clone(), torch.ops.qwen.fa_fused(*case.clone().args())
    _, default = run_backend(case, None)
    _, cpu = run_backend(case, "cpu")
    assert torch.equal(via_op, default) and torch.equal(default, cpu)


def test_backend_switch_from_environment(fresh_env):
    calls = []
    real = torch_qwen_fused.ops.fa_fused_eager
    fresh_env.setattr(torch_qwen_fused.ops, "fa_fused_eager", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    fresh_env.setenv("TORCH_QWEN_FUSED_BACKEND", "eager")
    run_backend(make_case([4]), None)
    assert calls == [1]


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be None or one of"):
        run_backend(make_case([4]), "cuda-graphs")


def test_fallback_kernel_serves_devices_without_a_kernel():
    # CPU has the C++ kernel; the CompositeExplicitAutograd fallback is what CUDA/MPS/... get.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("qwen::fa_fused", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("qwen::fa_fused", "CompositeExplicitAutograd")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("qwen::fa_fused", "CUDA")


@pytest.fixture
def fallback_on_cpu():
    """Routes CPU calls of the op through the eager fallback (as on a device without a kernel)."""
    with torch.library._scoped_library("qwen", "IMPL") as lib:
        lib.impl("fa_fused", torch_qwen_fused.backends.eager.fa_fused_eager, "CPU", allow_override=True)
        yield


def test_fallback_registration_matches_reference(fresh_env, fallback_on_cpu):
    # What a device without a kernel runs: torch.ops.qwen.fa_fused through the CompositeExplicitAutograd entry.
    case = make_case([1, 40, 3], 8, 2, 64, 16, torch.float32, skip_rows=(1,))
    fallback_case = case.clone()
    fallback_out = torch.ops.qwen.fa_fused(*fallback_case.args())
    record_errors("fallback", case, check_against_reference(fallback_case, fallback_out, case))


def opcheck_samples():
    return [make_case([1, 20], 8, 2, 64, 16, torch.float32),
            make_case([3, 17, 1], 10, 2, 64, 4, torch.bfloat16, skip_rows=(2,)),
            make_case([33], 4, 4, 128, 16, torch.float16, positions_offset=None)]


@pytest.mark.parametrize("sample", range(3))
def test_opcheck_cpu_kernel(fresh_env, sample):
    case = opcheck_samples()[sample]
    torch.library.opcheck(torch.ops.qwen.fa_fused.default, case.args(), {"eps": 1e-6, "scale": None})


def test_opcheck_fallback(fresh_env, fallback_on_cpu):
    torch.library.opcheck(torch.ops.qwen.fa_fused.default, opcheck_samples()[1].args())


def decode_step(q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table, seq_lens,
                positions, slot_mapping):
    return torch.ops.qwen.fa_fused(q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache,
                                   block_table, seq_lens, positions, slot_mapping) * 2.0


def test_torch_compile_fullgraph_matches_eager_without_recompiles(fresh_env):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(decode_step, backend=counter, fullgraph=True, dynamic=True)
    # B, max_blocks and num_blocks change; sizes are chosen not to coincide within a call (dynamo's
    # duck sizing would otherwise tie them, as in any user's graph).
    shapes = [[5, 40, 9], [1, 70, 9, 3, 7], [3, 3, 200, 12, 1, 33, 90]]
    for lens in shapes:
        case = make_case(lens, 10, 2, 64, 16, torch.float32, explicit_slots=True)
        compiled_case, eager_case = case.clone(), case.clone()
        out = compiled(*compiled_case.args())
        expected = decode_step(*eager_case.args())
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
        assert torch.equal(compiled_case.k_cache, eager_case.k_cache)
        assert torch.equal(compiled_case.v_cache, eager_case.v_cache)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} graphs for {len(shapes)} shapes"


def test_threads_on_separate_caches_match_serial(fresh_env):
    cases = [make_case([50 + 30 * i, 1, 130], 16, 2, 128, 16, torch.bfloat16, seed=i) for i in range(6)]
    serial = [run_backend(case, "cpu") for case in cases]
    working = [case.clone() for case in cases]
    outputs = [None] * len(cases)

    def worker(index):
        for _ in range(5):
            outputs[index] = torch.ops.qwen.fa_fused(*working[index].args())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for (serial_case, serial_out), threaded_case, threaded_out in zip(serial, working, outputs):
        torch.testing.assert_close(threaded_out, serial_out, **TOLERANCES[torch.bfloat16])
        assert torch.equal(threaded_case.k_cache, serial_case.k_cache)
        assert torch.equal(threaded_case.v_cache, serial_case.v_cache)


# ---------------------------------------------------------------------------------------------- in-place writes
BACKEND_CALLS = {
    "cpu": lambda c: torch.ops.qwen.fa_fused(*c.args()),
    "eager": lambda c: torch_qwen_fused.fa_fused(*c.args(), backend="eager"),
}


@pytest.mark.parametrize("backend", ["cpu", "eager", "fallback"])
def test_cache_writes_bump_versions_so_autograd_sees_them(fresh_env, request, backend):
    case = make_case([5, 40], 8, 2, 64, 16, torch.float32)
    if backend == "fallback":   # what CUDA/MPS/... run: the op dispatched to the eager fallback
        request.getfixturevalue("fallback_on_cpu")
    call = BACKEND_CALLS["cpu" if backend == "fallback" else backend]
    before = case.k_cache._version, case.v_cache._version
    call(case)
    assert case.k_cache._version > before[0] and case.v_cache._version > before[1]
    # A tensor autograd saved before the call is now stale: backward must refuse it, not use it.
    weight = torch.ones(64, requires_grad=True)
    loss = (case.k_cache * weight).sum()
    with torch.no_grad():
        call(case)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def empty_batch(case):
    """``case`` with B = 0 (every per-row tensor sliced to no rows)."""
    empty = case.clone()
    for name in ("q", "k", "v", "block_table", "seq_lens", "positions"):
        setattr(empty, name, getattr(empty, name)[:0])
    empty.written_rows = []
    return empty


@pytest.mark.parametrize("backend", ["cpu", "eager", "fallback", "compile"])
def test_empty_batch_returns_no_rows_and_writes_nothing(fresh_env, backend):
    case = empty_batch(make_case([5, 40], 10, 2, 64, 16, torch.bfloat16))
    before = case.clone()
    if backend == "fallback":
        out = torch_qwen_fused.backends.eager.fa_fused_eager(*case.args())
    elif backend == "compile":
        torch._dynamo.reset()
        out = torch.compile(torch.ops.qwen.fa_fused, fullgraph=True)(*case.args())
    else:
        out = BACKEND_CALLS[backend](case)
    assert out.shape == (0, 10, 64) and out.dtype == torch.bfloat16
    assert torch.equal(case.k_cache, before.k_cache) and torch.equal(case.v_cache, before.v_cache)


# ---------------------------------------------------------------------------------------------- switches
@pytest.mark.parametrize("value", ["0", "-5", "abc", "1.5", "", " 64", "64k"])
def test_bad_kv_chunk_switch_is_refused_before_any_write(fresh_env, value):
    fresh_env.setenv("TORCH_QWEN_FUSED_KV_CHUNK", value)
    case = make_case([70, 9])
    before = case.clone()
    with pytest.raises(RuntimeError, match="TORCH_QWEN_FUSED_KV_CHUNK must be a positive integer token count"):
        torch.ops.qwen.fa_fused(*case.args())
    assert torch.equal(case.k_cache, before.k_cache) and torch.equal(case.v_cache, before.v_cache)


@pytest.mark.parametrize("value", [str(2**63 - 1), "9" * 30, "1", "31"])
def test_extreme_kv_chunk_switch_is_clamped(fresh_env, value):
    # Was SIGFPE / heap corruption (2**63-1) and a B*Hkv*L*G*(D+2)-float workspace (1).
    fresh_env.setenv("TORCH_QWEN_FUSED_KV_CHUNK", value)
    check_backends(make_case([300, 1, 77], 16, 2, 128, 16, torch.float32), backends=("cpu",))


def test_kv_chunk_of_one_token_keeps_the_workspace_bounded(fresh_env):
    """Chunks are clamped to >= 32 tokens: the partial results stay ~1/32 of the K/V read. Unclamped, this
    call (B=1, L=20000, 40/8/128 fp32) allocated 416 MB of partials (peak RSS +397 MB; now +12 MB), measured
    in a fresh process around its first call (peak RSS only grows, so a later call would show nothing)."""
    script = (
        "import resource, torch, torch_qwen_fused; from torch_qwen_fused.testing import make_case\n"
        "case = make_case([20000], 40, 8, 128, 128, torch.float32, extra_blocks=0)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "torch.ops.qwen.fa_fused(*case.args())\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    import os
    import subprocess
    import sys

    env = dict(os.environ, TORCH_QWEN_FUSED_KV_CHUNK="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                            check=True)
    growth_mb = int(result.stdout.split()[-1])
    assert growth_mb < 100, f"peak RSS grew by {growth_mb} MB in a KV_CHUNK=1 call"


# ---------------------------------------------------------------------------------------------- layouts
def test_strided_inputs_are_read_in_place_with_the_same_result(fresh_env):
    """Views (cos/sin columns of a wider table, every other norm weight, a transposed or sliced block table,
    non-contiguous q/k/v) give bit-identical results to their contiguous copies, and are read in place."""
    case = make_case([5, 70, 33], 8, 2, 64, 16, torch.bfloat16, explicit_slots=True)
    contiguous_case, expected = run_backend(case, "cpu")
    strided = case.clone()
    wide_cos, wide_sin = (torch.cat((t, torch.full_like(t, float("nan"))), dim=1) for t in (case.cos, case.sin))
    strided.cos, strided.sin = wide_cos[:, :64], wide_sin[:, :64]
    strided.q_norm_weight = torch.stack((case.q_norm_weight, torch.full_like(case.q_norm_weight, float("nan"))),
                                        dim=1)[:, 0]
    strided.q = case.q.transpose(0, 1).contiguous().transpose(0, 1)
    strided.k = torch.cat((case.k, case.k), dim=2)[..., :64]
    assert not any(t.is_contiguous() for t in (strided.cos, strided.q_norm_weight, strided.q, strided.k))
    for table in (case.block_table.t().contiguous().t(), torch.cat((case.block_table, case.block_table), 1)[:, :5]):
        working = strided.clone()
        working.cos, working.sin = strided.cos, strided.sin          # clone() made them contiguous
        working.q_norm_weight, working.q, working.k = strided.q_norm_weight, strided.q, strided.k
        working.block_table = table
        out = torch.ops.qwen.fa_fused(*working.args())
        assert torch.equal(out, expected)
        assert torch.equal(working.k_cache, contiguous_case.k_cache)
        assert torch.equal(working.v_cache, contiguous_case.v_cache)


def test_float64_tables_are_accepted(fresh_env):
    case = make_case([9, 40], 8, 2, 64, 16, torch.float32)
    case.cos, case.sin = case.cos.double(), case.sin.double()
    case.q_norm_weight, case.k_norm_weight = case.q_norm_weight.double(), case.k_norm_weight.double()
    check_backends(case)


class LargestTensor(TorchDispatchMode):
    """Bytes of the largest tensor any torch op returns while active."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.bytes = max(self.bytes, t.numel() * t.element_size())
        return out


def test_eager_fallback_memory_follows_the_tokens_read(fresh_env):
    """One row of 4096 tokens and 15 of 16: the fallback reads row by row, so nothing it allocates is larger
    than a few times the longest row's K in fp32 (padding every row to the longest was 16x that)."""
    case = make_case([4096] + [16] * 15, 40, 8, 128, 128, torch.bfloat16)
    longest_row_keys = 4096 * 8 * 128 * 4
    with LargestTensor() as largest:
        out = torch_qwen_fused.fa_fused(*case.clone().args(), backend="eager")
    assert largest.bytes <= 2 * longest_row_keys, f"{largest.bytes} bytes vs {longest_row_keys} per row"
    _, expected = run_backend(case, "cpu")
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.bfloat16])
