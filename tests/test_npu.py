"""The Ascend NPU kernel (torch_qwen_fused/backends/npu.py): registered for PrivateUse1 without torch_npu or pypto.

Its Python code (the checks, ``prepare``, the launch call, the in-place caches and the returned tensor) runs
here with the NPU launch replaced by the pypto CPU replay of the same kernel; only the device launch itself
needs an Ascend NPU with CANN and torch_npu, and that test is skipped elsewhere.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from torch_qwen_fused.backends import npu
from torch_qwen_fused.backends.pypto import compat, replay
from torch_qwen_fused.testing import check_against_reference, make_case


def test_registered_for_privateuse1():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("qwen::fa_fused", "PrivateUse1")


def test_import_pulls_in_neither_torch_npu_nor_pypto():
    """In a fresh interpreter: importing the package registers the kernel and imports nothing else."""
    code = textwrap.dedent("""
        import sys
        import torch
        import torch_qwen_fused
        assert torch._C._dispatch_has_kernel_for_dispatch_key("qwen::fa_fused", "PrivateUse1")
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch_npu", "pypto"))
        assert not loaded, loaded
        print("ok")
    """)
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.skipif(compat.pypto_version() != compat.PYPTO_VERSION,
                    reason=f"replaying the NPU kernel needs pypto=={compat.PYPTO_VERSION}")
def test_npu_entry_point_runs_with_the_replay_as_launch(monkeypatch):
    """``fa_fused_npu`` end to end on CPU tensors, the compiled NPU kernel swapped for the replayed one."""
    if not (compat.calculator_dir() / "libtile_fwk_calculator.so").exists() and replay_tools_missing():
        pytest.skip("the pypto CPU replay needs cmake and g++ once, to build pypto's interpreter library")
    launched = []

    def replay_as_launch(config):
        kernel = replay._replay_kernel(config)
        return lambda *kernel_args: launched.append(kernel_args) or kernel(*kernel_args)

    monkeypatch.setattr(npu, "_npu_kernel", replay_as_launch)
    case = make_case([1, 16, 17, 40], 4, 2, 64, 16, torch.float32, skip_rows=(2,))
    working = case.clone()
    with compat.sandbox() as tmp, compat.replay_verify_data(), compat.captured_output(tmp):
        out = npu.fa_fused_npu(*working.args())
    (kernel_args,) = launched
    # The launch got the caller's caches (written in place) and returns its own out tensor.
    assert kernel_args[7] is working.k_cache and kernel_args[8] is working.v_cache
    assert out is kernel_args[-1]
    check_against_reference(working, out, case)


def replay_tools_missing() -> bool:
    return shutil.which("cmake") is None or shutil.which("g++") is None


def _npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None or not os.environ.get("ASCEND_HOME_PATH"):
        return False
    try:
        import torch_npu  # noqa: F401
    except Exception:  # noqa: BLE001 (a broken install is "no NPU" here)
        return False
    return torch.npu.is_available()


@pytest.mark.npu
@pytest.mark.skipif(not _npu_available(), reason="needs an Ascend NPU (CANN with ASCEND_HOME_PATH, torch_npu)")
def test_launch_on_npu_matches_reference():
    case = make_case([1, 128, 129, 300], 10, 2, 128, 128, torch.bfloat16, skip_rows=(3,))
    on_npu = case.clone()
    for name, value in vars(on_npu).items():
        if isinstance(value, torch.Tensor):
            setattr(on_npu, name, value.to("npu"))
    out = torch.ops.qwen.fa_fused(*on_npu.args())
    torch.npu.synchronize()
    back = case.clone()
    back.k_cache, back.v_cache = on_npu.k_cache.cpu(), on_npu.v_cache.cpu()
    check_against_reference(back, out.cpu(), case)
