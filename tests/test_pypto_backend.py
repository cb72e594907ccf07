"""The pypto kernel replayed on the CPU by pypto's graph interpreter (``backend="pypto"``) vs the eager fallback.

Each replay compiles the kernel (no compile cache in pypto's SIM mode) and interprets it: seconds
per call. The default run has one small case that still covers ragged lengths (1 and a block
boundary), GQA and a ``slot_mapping = -1`` row; ``make test-pypto`` (``-m pypto_full``) runs them all.
The first replay on a machine builds pypto's interpreter library once into the user cache dir
(cmake + g++, about a minute; see torch_qwen_fused/pypto_compat.py).
"""

import glob
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

import torch_qwen_fused
from torch_qwen_fused import pypto_compat
from torch_qwen_fused.reference import default_slot_mapping

if pypto_compat.pypto_version() != pypto_compat.PYPTO_VERSION:
    pytest.skip(f"the pypto backend needs pypto=={pypto_compat.PYPTO_VERSION} "
                f"(found {pypto_compat.pypto_version() or 'none'})", allow_module_level=True)


def _replay_available() -> None:
    lib = pypto_compat.calculator_dir() / "libtile_fwk_calculator.so"
    if not lib.exists() and (shutil.which("cmake") is None or shutil.which("g++") is None):
        pytest.skip("the pypto CPU replay needs cmake and g++ once, to build pypto's interpreter library")


# SPEC section 4
TOLERANCES = {torch.float32: dict(atol=1e-5, rtol=0.0),
              torch.float16: dict(atol=2e-2, rtol=5e-3),
              torch.bfloat16: dict(atol=2e-2, rtol=5e-3)}


def make_case(batch, num_heads, num_kv_heads, head_dim, block_size, seq_lens, dtype, cache_dtype=None,
              skip_rows=(), positions_shift=None, seed=0):
    """Random inputs with a shuffled block table; rows in ``skip_rows`` get slot_mapping -1."""
    gen = torch.Generator().manual_seed(seed)
    cache_dtype = cache_dtype or dtype
    max_blocks = max(-(-n // block_size) for n in seq_lens) + 1
    num_blocks = batch * max_blocks + 3
    q = torch.randn(batch, num_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, num_kv_heads, head_dim, generator=gen).to(dtype)
    q_norm_weight = torch.rand(head_dim, generator=gen) + 0.5
    k_norm_weight = torch.rand(head_dim, generator=gen) + 0.5
    cos, sin = torch_qwen_fused.rope_cos_sin(512, head_dim)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(cache_dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(cache_dtype)
    block_table = torch.randperm(num_blocks, generator=gen)[:batch * max_blocks].reshape(batch, max_blocks).int()
    seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
    positions = None
    if positions_shift is not None:  # HF left padding: RoPE position != cache position
        positions = (seq_lens.long() - 1 + torch.tensor(positions_shift)).clamp(min=0)
    slot_mapping = None
    if skip_rows:
        slot_mapping = default_slot_mapping(block_table, seq_lens, block_size)
        slot_mapping[list(skip_rows)] = -1
    return [q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table, seq_lens,
            positions, slot_mapping]


def _clone(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def check_against_eager(args, **kwargs):
    """Run eager and pypto on copies; compare the output (rows that were written) and both whole caches."""
    eager_args, pypto_args = _clone(args), _clone(args)
    expected = torch_qwen_fused.fa_fused(*eager_args, backend="eager", **kwargs)
    actual = torch_qwen_fused.fa_fused(*pypto_args, backend="pypto", **kwargs)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    slot_mapping = args[12]
    rows = slot_mapping >= 0 if slot_mapping is not None else torch.ones(args[0].shape[0], dtype=torch.bool)
    tol = TOLERANCES[args[0].dtype]
    torch.testing.assert_close(actual[rows].float(), expected[rows].float(), **tol)
    cache_tol = TOLERANCES[args[7].dtype]
    torch.testing.assert_close(pypto_args[7].float(), eager_args[7].float(), **cache_tol)  # k_cache
    torch.testing.assert_close(pypto_args[8].float(), eager_args[8].float(), **cache_tol)  # v_cache
    errors = {"out": (actual[rows].float() - expected[rows].float()).abs().max().item(),
              "k_cache": (pypto_args[7].float() - eager_args[7].float()).abs().max().item(),
              "v_cache": (pypto_args[8].float() - eager_args[8].float()).abs().max().item()}
    print(f"max abs error vs eager: {errors}")
    return errors


# (id, make_case kwargs, fa_fused kwargs)
SMALL_CASE = ("fp32-gqa2-ragged-skiprow",
              dict(batch=4, num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, seq_lens=(1, 16, 17, 40),
                   dtype=torch.float32, skip_rows=(2,)), {})
FULL_CASES = [
    ("bf16-gqa5-ragged-skiprow",
     dict(batch=4, num_heads=10, num_kv_heads=2, head_dim=64, block_size=16, seq_lens=(1, 16, 17, 40),
          dtype=torch.bfloat16, skip_rows=(3,)), {}),
    ("fp32-gqa1-d128-boundary",
     dict(batch=3, num_heads=4, num_kv_heads=4, head_dim=128, block_size=16, seq_lens=(33, 1, 32),
          dtype=torch.float32), {}),
    ("fp16-q-bf16-cache-gqa2-block8-positions",
     dict(batch=3, num_heads=4, num_kv_heads=2, head_dim=64, block_size=8, seq_lens=(9, 2, 24),
          dtype=torch.float16, cache_dtype=torch.bfloat16, positions_shift=(3, 0, -5)), dict(scale=0.1)),
    ("bf16-gqa5-d128-block128",
     dict(batch=2, num_heads=10, num_kv_heads=2, head_dim=128, block_size=128, seq_lens=(129, 5),
          dtype=torch.bfloat16), dict(eps=1e-5)),
    # several phase-1 tasks per row with the default tiles (16 blocks a task, task loop unrolled by 2):
    # 38 blocks = an unrolled pair + a remainder task, 17 blocks = one pair, 1 block
    ("bf16-gqa2-block8-multitask",
     dict(batch=3, num_heads=4, num_kv_heads=2, head_dim=64, block_size=8, seq_lens=(300, 129, 3),
          dtype=torch.bfloat16), {}),
]


def _snapshot(directory: Path) -> set:
    return set(os.listdir(directory)) if directory.is_dir() else set()


def _stray_sandboxes() -> set:
    pattern = os.path.join(tempfile.gettempdir(), "torch_qwen_fused_pypto_*")
    return {path for path in glob.glob(pattern) if "_process_" not in os.path.basename(path)}


def test_replay_small_case_leaves_no_files(tmp_path, monkeypatch):
    """The default-run case: correct vs eager, and nothing left in cwd, home or the repo; logging untouched."""
    _replay_available()
    _, case_kwargs, call_kwargs = SMALL_CASE
    home = Path(os.path.expanduser("~"))
    repo = Path(__file__).resolve().parent.parent
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    before_home, before_repo, before_tmp = _snapshot(home), _snapshot(repo), _stray_sandboxes()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)

    check_against_eager(make_case(**case_kwargs), **call_kwargs)

    assert os.listdir(workdir) == [], "the pypto replay left files in the working directory"
    # The interpreter library's per-user cache (~/.cache/torch_qwen_fused) is the one thing allowed.
    new_home = _snapshot(home) - before_home - {".cache"}
    assert not new_home, f"the pypto replay left {sorted(new_home)} in {home}"
    cache = home / ".cache"
    if cache.is_dir() and ".cache" not in before_home:
        assert set(os.listdir(cache)) <= {"torch_qwen_fused"}
    assert _snapshot(repo) - before_repo == set(), "the pypto replay left files in the repository"
    assert _stray_sandboxes() - before_tmp == set(), "the per-call temp dir was not removed"
    assert root.level == level and list(root.handlers) == handlers, "the root logger was changed"


@pytest.mark.pypto_full
@pytest.mark.parametrize("case_kwargs, call_kwargs", [c[1:] for c in FULL_CASES], ids=[c[0] for c in FULL_CASES])
def test_replay_matches_eager(case_kwargs, call_kwargs):
    _replay_available()
    check_against_eager(make_case(**case_kwargs), **call_kwargs)


@pytest.mark.pypto_full
def test_npu_kernel_python_path_on_replay(monkeypatch):
    """npu.fa_fused_npu's own code (validation, prepare, launch, result) with the replay kernel swapped in."""
    _replay_available()
    from torch_qwen_fused import npu, pypto_backend

    monkeypatch.setattr(npu, "_npu_kernel", pypto_backend._replay_kernel)
    _, case_kwargs, _ = SMALL_CASE
    args = make_case(**case_kwargs)
    eager_args, npu_args = _clone(args), _clone(args)
    expected = torch_qwen_fused.fa_fused(*eager_args, backend="eager")
    with pypto_compat.sandbox() as tmp, pypto_compat.replay_verify_data(), pypto_compat.captured_output(tmp):
        actual = npu.fa_fused_npu(*npu_args)
    rows = args[12] >= 0
    torch.testing.assert_close(actual[rows], expected[rows], **TOLERANCES[torch.float32])
    torch.testing.assert_close(npu_args[7], eager_args[7], **TOLERANCES[torch.float32])


def test_bad_input_raises_before_anything_is_written():
    """Validation runs before pypto is even imported; the caches stay byte-for-byte unchanged."""
    _, case_kwargs, _ = SMALL_CASE
    args = make_case(**case_kwargs)
    args[10] = args[10].clone()
    args[10][0] = 0  # seq_len < 1
    k_before, v_before = args[7].clone(), args[8].clone()
    with pytest.raises(ValueError, match="seq_lens"):
        torch_qwen_fused.fa_fused(*args, backend="pypto")
    assert torch.equal(args[7], k_before) and torch.equal(args[8], v_before)


def test_replay_rejects_non_cpu_tensors():
    _, case_kwargs, _ = SMALL_CASE
    args = make_case(**case_kwargs)
    args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(ValueError, match="needs CPU tensors"):
        torch_qwen_fused.fa_fused(*args, backend="pypto")


def test_version_pin_is_checked(monkeypatch):
    monkeypatch.setattr(pypto_compat, "_pypto", None)
    monkeypatch.setattr(pypto_compat, "pypto_version", lambda: "0.3.0")
    with pytest.raises(ImportError, match="pinned to pypto==0.2.0"):
        pypto_compat.import_pypto()
    monkeypatch.setattr(pypto_compat, "pypto_version", lambda: "")
    with pytest.raises(ImportError, match="needs pypto==0.2.0"):
        pypto_compat.import_pypto()
