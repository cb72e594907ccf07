"""fp8 KV caches and the per-layer k_scale / v_scale (docs/contract.md, section 7), against the fp64 reference.

The caches store saturate(x / scale) rounded to nearest even in float8_e4m3fn or float8_e5m2, and attention reads
stored * scale. Covered: every ISA the CPU runs (the AVX-512 kernel hands fp8 caches to the AVX2 one), q in fp32
and bf16, scales given or not, saturation instead of overflow, NaN kept, several new tokens per row, bad scales
refused, compile without recompiles when a scale changes, opcheck, and the pypto backend's refusal.
"""

import pytest
import torch

import torch_qwen_fused
from conftest import check_backends, run_backend
from torch_qwen_fused.testing import ISAS, assert_same_bytes, check_against_reference, cpu_supports, make_case

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def fp8_case(cache_dtype, dtype=torch.float32, scales=(0.05, 0.03), seq_lens=(40, 5, 300), **kwargs):
    """Caches holding K/V of the scale's range (a real layer's cache is filled through the same scales)."""
    case = make_case(list(seq_lens), 10, 2, 64, 16, dtype, cache_dtype=cache_dtype, **kwargs)
    if scales is not None:
        case.k_scale, case.v_scale = torch.tensor([scales[0]]), torch.tensor([scales[1]])
    return case


@pytest.mark.parametrize("scales", [None, (0.05, 0.03)], ids=["no-scales", "scales"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache_dtype", FP8, ids=["e4m3fn", "e5m2"])
@pytest.mark.parametrize("isa", ISAS)
def test_fp8_cache_matches_reference(fresh_env, isa, cache_dtype, dtype, scales):
    if not cpu_supports(isa):
        pytest.skip(f"this CPU cannot run the {isa} kernel")
    fresh_env.setenv("TORCH_QWEN_FUSED_CPU_ISA", isa)
    check_backends(fp8_case(cache_dtype, dtype, scales, skip_rows=(1,)))


@pytest.mark.parametrize("cache_dtype", FP8, ids=["e4m3fn", "e5m2"])
def test_overflow_saturates_and_nan_stays_nan(fresh_env, cache_dtype):
    case = fp8_case(cache_dtype, scales=(1e-6, 1.0), seq_lens=(30, 9), explicit_slots=True)
    case.v[1, 0, 4] = float("nan")
    for backend in ("cpu", "eager"):
        result_case, out = run_backend(case, backend)
        check_against_reference(result_case, out, case)
        written = result_case.k_cache.flatten(0, 1)[case.slots()].float()
        assert written.abs().max() == torch.finfo(cache_dtype).max   # k / 1e-6 is far past the range
        assert torch.isfinite(written).all()
        assert result_case.v_cache.flatten(0, 1)[case.slots()[1], 0, 4].float().isnan()


@pytest.mark.parametrize("cache_dtype", FP8, ids=["e4m3fn", "e5m2"])
def test_several_new_tokens_per_row(fresh_env, cache_dtype):
    check_backends(fp8_case(cache_dtype, torch.bfloat16, new_tokens=[4, 1, 8]))


def test_scales_apply_to_any_cache_dtype(fresh_env):
    check_backends(fp8_case(torch.bfloat16, scales=(0.5, 2.0)))


BAD_SCALES = {
    "two elements": (lambda: torch.tensor([0.1, 0.2]), "k_scale must be a float32 tensor of one element"),
    "float64": (lambda: torch.tensor([0.1], dtype=torch.float64), "k_scale must be a float32 tensor of one element"),
    "zero": (lambda: torch.tensor([0.0]), "k_scale must be finite and > 0, got 0"),
    "negative": (lambda: torch.tensor([-1.0]), "k_scale must be finite and > 0, got -1"),
    "nan": (lambda: torch.tensor([float("nan")]), "k_scale must be finite and > 0, got nan"),
}


@pytest.mark.parametrize("name", list(BAD_SCALES))
def test_bad_scales_are_refused_before_any_write(name):
    make_scale, expected = BAD_SCALES[name]
    messages = set()
    for backend in ("cpu", "eager"):
        case = fp8_case(torch.float8_e4m3fn)
        case.k_scale = make_scale()
        k_before, v_before = case.k_cache.clone(), case.v_cache.clone()
        with pytest.raises(ValueError) as error:
            torch_qwen_fused.fa_fused(*case.args(), backend=backend, **case.scales())
        message = str(error.value).splitlines()[0]
        assert expected in message, message
        messages.add(message)
        assert_same_bytes(case.k_cache, k_before)
        assert_same_bytes(case.v_cache, v_before)
    assert len(messages) == 1, messages


def test_pypto_backend_refuses_fp8_caches_clearly():
    with pytest.raises(ValueError, match="takes float32/float16/bfloat16 caches without k_scale/v_scale"):
        case = fp8_case(torch.float8_e5m2)
        torch_qwen_fused.fa_fused(*case.args(), backend="pypto", **case.scales())


def scaled_step(*args, k_scale, v_scale):
    return torch.ops.qwen.fa_fused(*args, k_scale=k_scale, v_scale=v_scale) * 2.0


def test_new_scale_values_do_not_recompile(fresh_env):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(scaled_step, backend=counter, fullgraph=True)
    for k_scale, v_scale in [(0.05, 0.03), (0.2, 0.01)]:
        case = fp8_case(torch.float8_e4m3fn, scales=(k_scale, v_scale), seq_lens=(40, 5, 300), explicit_slots=True)
        compiled_case, eager_case = case.clone(), case.clone()
        out = compiled(*compiled_case.args(), **compiled_case.scales())
        torch.testing.assert_close(out, scaled_step(*eager_case.args(), **eager_case.scales()), atol=1e-6, rtol=0)
        assert torch.equal(compiled_case.k_cache.view(torch.uint8), eager_case.k_cache.view(torch.uint8))
    assert counter.frame_count == 1


@pytest.mark.parametrize("cache_dtype", FP8, ids=["e4m3fn", "e5m2"])
def test_opcheck(fresh_env, cache_dtype):
    case = fp8_case(cache_dtype, torch.bfloat16, seq_lens=(20, 3), skip_rows=(1,))
    # test_schema compares the mutated caches with arithmetic torch has no fp8 kernels for; the rest runs.
    torch.library.opcheck(torch.ops.qwen.fa_fused.default, case.args(), case.scales(),
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
