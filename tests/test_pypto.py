"""The pypto kernel (torch_qwen_fused/backends/pypto/) replayed on the CPU by pypto's graph interpreter
(``backend="pypto"``), against the fp64 reference of the contract.

Each replay compiles the kernel (no compile cache in pypto's SIM mode) and interprets it: seconds per call.
The default run has one small case that still covers ragged lengths (1 and a block boundary), GQA and a
``slot_mapping = -1`` row; ``make test-pypto`` (``-m pypto_full``) runs them all. The first replay on a machine
builds pypto's interpreter library once into the user cache dir (cmake + g++, about a minute; see
torch_qwen_fused/backends/pypto/compat.py). Tests that need no replay run without pypto.
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
from torch_qwen_fused.backends.pypto import compat
from torch_qwen_fused.testing import assert_same_bytes, check_against_reference, make_case

needs_pypto = pytest.mark.skipif(compat.pypto_version() != compat.PYPTO_VERSION,
                                 reason=f"the pypto replay needs pypto=={compat.PYPTO_VERSION} "
                                        f"(found {compat.pypto_version() or 'none'})")


def needs_replay_build() -> None:
    lib = compat.calculator_dir() / "libtile_fwk_calculator.so"
    if not lib.exists() and (shutil.which("cmake") is None or shutil.which("g++") is None):
        pytest.skip("the pypto CPU replay needs cmake and g++ once, to build pypto's interpreter library")


def check_replay(case, **kwargs) -> dict:
    result_case = case.clone()
    out = torch_qwen_fused.fa_fused(*result_case.args(), backend="pypto", **kwargs)
    assert out.dtype == case.q.dtype and out.shape == case.q.shape
    errors = check_against_reference(result_case, out, case, **kwargs)
    print(f"pypto replay, max abs error vs the fp64 reference: {errors}")
    return errors


# (id, make_case kwargs, fa_fused kwargs)
SMALL_CASE = ("fp32-gqa2-ragged-skiprow",
              dict(seq_lens=[1, 16, 17, 40], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                   dtype=torch.float32, skip_rows=(2,)), {})
FULL_CASES = [
    ("bf16-gqa5-ragged-skiprow",
     dict(seq_lens=[1, 16, 17, 40], num_heads=10, num_kv_heads=2, head_dim=64, block_size=16,
          dtype=torch.bfloat16, skip_rows=(3,)), {}),
    ("fp32-gqa1-d128-boundary",
     dict(seq_lens=[33, 1, 32], num_heads=4, num_kv_heads=4, head_dim=128, block_size=16, dtype=torch.float32,
          positions_offset=None), {}),
    ("fp16-q-bf16-cache-gqa2-block8-positions",
     dict(seq_lens=[9, 2, 24], num_heads=4, num_kv_heads=2, head_dim=64, block_size=8, dtype=torch.float16,
          cache_dtype=torch.bfloat16, positions_offset=5), dict(scale=0.1)),
    ("bf16-gqa5-d128-block128",
     dict(seq_lens=[129, 5], num_heads=10, num_kv_heads=2, head_dim=128, block_size=128, dtype=torch.bfloat16),
     dict(eps=1e-5)),
    # several phase-1 tasks per row with the default tiles (16 blocks a task, task loop unrolled by 2):
    # 38 blocks = an unrolled pair + a remainder task, 17 blocks = one pair, 1 block
    ("bf16-gqa2-block8-multitask",
     dict(seq_lens=[300, 129, 3], num_heads=4, num_kv_heads=2, head_dim=64, block_size=8, dtype=torch.bfloat16),
     {}),
]


def _snapshot(directory: Path) -> set:
    return set(os.listdir(directory)) if directory.is_dir() else set()


def _stray_sandboxes() -> set:
    pattern = os.path.join(tempfile.gettempdir(), "torch_qwen_fused_pypto_*")
    return {path for path in glob.glob(pattern) if "_process_" not in os.path.basename(path)}


@needs_pypto
def test_replay_small_case_leaves_no_files(tmp_path, monkeypatch):
    """The default-run case: correct, and nothing left in cwd, home or the repo; logging untouched."""
    needs_replay_build()
    _, case_kwargs, call_kwargs = SMALL_CASE
    home = Path(os.path.expanduser("~"))
    repo = Path(__file__).resolve().parent.parent
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    before_home, before_repo, before_tmp = _snapshot(home), _snapshot(repo), _stray_sandboxes()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)

    check_replay(make_case(**case_kwargs), **call_kwargs)

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


@needs_pypto
def test_replay_bumps_the_cache_versions():
    needs_replay_build()
    case = make_case(**SMALL_CASE[1])
    before = case.k_cache._version, case.v_cache._version
    torch_qwen_fused.fa_fused(*case.args(), backend="pypto")
    assert case.k_cache._version > before[0] and case.v_cache._version > before[1]


@pytest.mark.pypto_full
@needs_pypto
@pytest.mark.parametrize("case_kwargs, call_kwargs", [c[1:] for c in FULL_CASES], ids=[c[0] for c in FULL_CASES])
def test_replay_matches_reference(case_kwargs, call_kwargs):
    needs_replay_build()
    check_replay(make_case(**case_kwargs), **call_kwargs)


def test_bad_input_raises_before_pypto_is_imported():
    """The op's checks run before pypto is even imported; the caches stay byte-for-byte unchanged."""
    case = make_case(**SMALL_CASE[1])
    case.seq_lens[0] = 0
    k_before, v_before = case.k_cache.clone(), case.v_cache.clone()
    with pytest.raises(ValueError, match="seq_lens"):
        torch_qwen_fused.fa_fused(*case.args(), backend="pypto")
    assert_same_bytes(case.k_cache, k_before)
    assert_same_bytes(case.v_cache, v_before)


def test_replay_rejects_non_cpu_tensors():
    case = make_case(**SMALL_CASE[1])
    meta_args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in case.args()]
    with pytest.raises(ValueError, match="needs CPU tensors"):
        torch_qwen_fused.fa_fused(*meta_args, backend="pypto")


def test_version_pin_is_checked(monkeypatch):
    monkeypatch.setattr(compat, "_pypto", None)
    monkeypatch.setattr(compat, "pypto_version", lambda: "0.3.0")
    with pytest.raises(ImportError, match="pinned to pypto==0.2.0"):
        compat.import_pypto()
    monkeypatch.setattr(compat, "pypto_version", lambda: "")
    with pytest.raises(ImportError, match="needs pypto==0.2.0"):
        compat.import_pypto()
