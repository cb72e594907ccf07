"""Fixtures of the fa_fused tests; their inputs and the fp64 reference live in torch_qwen_fused.testing."""

import pytest

import torch_qwen_fused
from torch_qwen_fused.testing import Case, check_against_reference

SWITCHES = ("TORCH_QWEN_FUSED_CPU_ISA", "TORCH_QWEN_FUSED_KV_CHUNK", "TORCH_QWEN_FUSED_BACKEND")


def run_backend(case: Case, backend: str, **kwargs):
    """Runs a fresh copy of ``case`` through ``backend``; returns (case after the call, output)."""
    working = case.clone()
    api = torch_qwen_fused.fa_fused_varlen if case.varlen else torch_qwen_fused.fa_fused
    out = api(*working.args(), backend=backend, **working.scales(), **kwargs)
    return working, out


def check_backends(case: Case, backends=("cpu", "eager"), **kwargs):
    """Runs ``case`` through each backend and checks output and caches against the fp64 reference (errors
    recorded for the summary); returns the first backend's output."""
    outputs = []
    for backend in backends:
        result_case, out = run_backend(case, backend, **kwargs)
        label = f"{backend} varlen" if case.varlen else backend
        record_errors(label, case, check_against_reference(result_case, out, case, **kwargs))
        outputs.append(out)
    return outputs[0]


class Switches:
    """Sets the kernel switches for one test; the CPU kernel reads them again at its next call."""

    def __init__(self, monkeypatch):
        self._monkeypatch = monkeypatch

    def setenv(self, name: str, value: str) -> None:
        self._monkeypatch.setenv(name, value)
        torch_qwen_fused.reload_cpu_switches()

    def delenv(self, name: str) -> None:
        self._monkeypatch.delenv(name, raising=False)
        torch_qwen_fused.reload_cpu_switches()

    def setattr(self, *args) -> None:
        self._monkeypatch.setattr(*args)


@pytest.fixture
def fresh_env(monkeypatch):
    """No kernel switch set (each test sets its own); the previous environment is back afterwards."""
    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)
    torch_qwen_fused.reload_cpu_switches()
    yield Switches(monkeypatch)
    monkeypatch.undo()
    torch_qwen_fused.reload_cpu_switches()


# Max abs error per (backend, dtype, quantity) over the run, printed at the end of the session.
MAX_ERRORS: dict = {}


def record_errors(backend: str, case: Case, errors: dict) -> None:
    dtype = str(case.q.dtype).replace("torch.", "")
    if case.k_cache.dtype != case.q.dtype:
        dtype += "/" + str(case.k_cache.dtype).replace("torch.", "") + " cache"
    for quantity, value in errors.items():
        key = (backend, dtype, quantity)
        MAX_ERRORS[key] = max(MAX_ERRORS.get(key, 0.0), value)


def pytest_terminal_summary(terminalreporter):
    if MAX_ERRORS:
        terminalreporter.section("fa_fused max abs error vs the fp64 reference")
        for (backend, dtype, quantity), value in sorted(MAX_ERRORS.items()):
            terminalreporter.write_line(f"{backend:>10} {dtype:>24} {quantity:>8}: {value:.3e}")
