"""The Ascend NPU kernel (torch_qwen_fused/npu.py): registered for PrivateUse1 without torch_npu or pypto.

The launch test needs an Ascend NPU with CANN and torch_npu and is skipped elsewhere; the kernel it
launches is the one tests/test_pypto_backend.py replays on the CPU.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import torch_qwen_fused
from torch_qwen_fused import npu


def test_registered_for_privateuse1():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("qwen::fa_fused", "PrivateUse1")
    assert npu.DISPATCH_KEY == "PrivateUse1"


def test_import_pulls_in_neither_torch_npu_nor_pypto():
    """In a fresh interpreter: importing the package and npu.py registers the kernel, imports nothing else."""
    code = textwrap.dedent("""
        import sys
        import torch
        import torch_qwen_fused
        import torch_qwen_fused.npu
        assert torch._C._dispatch_has_kernel_for_dispatch_key("qwen::fa_fused", "PrivateUse1")
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch_npu", "pypto"))
        assert not loaded, loaded
        print("ok")
    """)
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


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
def test_launch_on_npu_matches_eager():
    from test_pypto_backend import TOLERANCES, make_case

    args = make_case(batch=4, num_heads=10, num_kv_heads=2, head_dim=128, block_size=128,
                     seq_lens=(1, 128, 129, 300), dtype=torch.bfloat16, skip_rows=(3,))
    cpu_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    expected = torch_qwen_fused.fa_fused(*cpu_args, backend="eager")
    npu_args = [a.to("npu") if isinstance(a, torch.Tensor) else a for a in args]
    actual = torch.ops.qwen.fa_fused(*npu_args)
    torch.npu.synchronize()
    rows = args[12] >= 0
    torch.testing.assert_close(actual.cpu()[rows].float(), expected[rows].float(), **TOLERANCES[torch.bfloat16])
    torch.testing.assert_close(npu_args[7].cpu().float(), cpu_args[7].float(), **TOLERANCES[torch.bfloat16])
    torch.testing.assert_close(npu_args[8].cpu().float(), cpu_args[8].float(), **TOLERANCES[torch.bfloat16])
