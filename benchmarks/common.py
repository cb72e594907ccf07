"""Shared pieces of the benchmark scripts: timing, memory, environment record, progress, output.

Each ``bench_*.py`` builds its own inputs and methods and hands them to these helpers, so every
benchmark times the same way (interleaved reps, median / min / max), records the machine and library
versions with its results, and writes one JSON that ``plot.py`` turns into a PNG.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def int_list(text: str) -> List[int]:
    """argparse type: ``"1,4,16"`` -> ``[1, 4, 16]``."""
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def name_list(choices: Sequence[str]) -> Callable[[str], List[str]]:
    """argparse type factory: a comma-separated subset of ``choices``, in the order given."""
    def parse(text: str) -> List[str]:
        names = [item.strip() for item in text.split(",") if item.strip()]
        bad = [name for name in names if name not in choices]
        if not names or bad:
            raise argparse.ArgumentTypeError(f"expected a subset of {list(choices)}, got {text!r}")
        return names
    return parse


# argparse type: ``"bf16,fp32"`` -> ``["bf16", "fp32"]`` (names of ``DTYPES``).
dtype_list = name_list(tuple(DTYPES))


# ---------------------------------------------------------------------------------------------
# Environment record
# ---------------------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
    """HEAD's commit, read from the .git files directly (no git process; None if not a checkout)."""
    git = REPO_ROOT / ".git"
    try:
        if git.is_file():  # a worktree or submodule: "gitdir: <path>"
            git = (REPO_ROOT / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        common = git
        if (git / "commondir").is_file():
            common = (git / (git / "commondir").read_text().strip()).resolve()
        for base in (git, common):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split(" ", 1)[0]
    except (OSError, IndexError):
        pass
    return None


def environment() -> Dict[str, object]:
    """Machine, thread counts, library versions, commit and a UTC timestamp for a results file."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    try:
        import torch_qwen_fused
        from importlib.metadata import version
        package_version = version("torch_qwen_fused")
        package_path = str(Path(torch_qwen_fused.__file__).parent)
    except Exception:  # noqa: BLE001 (a record, not a check)
        package_version, package_path = None, None
    return {
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "torch_num_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_qwen_fused": package_version,
        "torch_qwen_fused_path": package_path,
        "env": {name: os.environ[name] for name in
                ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCH_QWEN_FUSED_CPU_ISA", "TORCH_QWEN_FUSED_BACKEND")
                if name in os.environ},
        "git_commit": _git_commit(),
        "argv": sys.argv,
    }


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def summarize(times_s: Sequence[float]) -> Dict[str, object]:
    """Median, min, max and mean of a list of durations in seconds (the raw list is kept too)."""
    return {
        "median_s": statistics.median(times_s),
        "min_s": min(times_s),
        "max_s": max(times_s),
        "mean_s": statistics.fmean(times_s),
        "reps": len(times_s),
        "times_s": list(times_s),
    }


def last_level_cache_bytes(default: int = 32 * 2**20) -> int:
    """Size of this machine's largest CPU cache (Linux sysfs), or ``default`` where it cannot be read."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (entry / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes) if sizes else default


class CacheFlusher:
    """Evicts the last-level cache between timed calls by writing a buffer of ``mib`` MiB (0: off; None:
    twice this machine's last-level cache)."""

    def __init__(self, mib: Optional[int]):
        if mib is None:
            mib = 2 * last_level_cache_bytes() // 2**20
        self.mib = mib
        self.buffer = torch.empty(mib * 2**20 // 4, dtype=torch.float32) if mib > 0 else None

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.fill_(1.0)


def time_interleaved(methods: Dict[str, Callable[[], object]], reps: int, warmup: int,
                     on_rep: Optional[Callable[[], None]] = None,
                     before_call: Optional[Callable[[], None]] = None) -> Dict[str, List[float]]:
    """Time each method ``reps`` times, side by side: every rep calls every method once.

    The order of the methods rotates by one each rep so that no method always runs right after the
    same neighbour (whose cache footprint or thread wake-up it would inherit). ``warmup`` rounds run
    first, untimed. ``before_call`` (e.g. a cache flush) runs before every call, outside the timing.
    Returns ``{name: [seconds per rep]}``.
    """
    names = list(methods)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for rep in range(warmup + reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            fn = methods[name]
            if before_call is not None:
                before_call()
            start = time.perf_counter_ns()
            fn()
            elapsed = time.perf_counter_ns() - start
            if rep >= warmup:
                times[name].append(elapsed * 1e-9)
        if on_rep is not None:
            on_rep()
    return times


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------

def peak_extra_bytes(fn: Callable[[], object]) -> Dict[str, int]:
    """Peak and net bytes that one call of ``fn`` allocates through torch's CPU allocator.

    Runs ``fn`` once under ``torch.profiler`` with ``profile_memory=True`` and replays the
    allocator's [memory] events (+bytes on allocation, -bytes on free, in time order): the peak of
    the running sum is the most memory the call held on top of what existed before it (its
    inputs), the final sum is what it still held at its end (its output). Sees every tensor and every
    ``at::empty`` scratch buffer inside C++ kernels, not ``malloc``/``std::vector`` inside them.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()  # kept alive until the profile ends: the output counts in net_bytes
    del result
    cpu = torch._C._autograd.DeviceType.CPU
    events = [event for event in prof.profiler.kineto_results.events()
              if event.name() == "[memory]" and event.device_type() == cpu]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return {"peak_extra_bytes": peak, "net_bytes": running}


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------

class Progress:
    """A progress bar on stderr: tqdm when it is installed, else a plain line every few percent."""

    def __init__(self, total: int, desc: str):
        self.total, self.count, self.desc = total, 0, desc
        self.last_percent = -1
        self.started = time.monotonic()
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            self.bar = None

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def update(self, n: int = 1) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
            return
        percent = 100 * self.count // max(self.total, 1)
        if percent >= self.last_percent + 5 or self.count == self.total:
            self.last_percent = percent
            elapsed = time.monotonic() - self.started
            print(f"{self.desc}: {self.count}/{self.total} ({percent}%) {elapsed:.0f}s "
                  f"{getattr(self, 'postfix', '')}", file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        """Print a line without breaking the bar."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def write_json(path: Path, payload: Dict[str, object]) -> Path:
    """Write ``payload`` as indented JSON, atomically (a ``.tmp`` file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def format_table(rows: Iterable[Dict[str, object]], columns: Sequence[str]) -> str:
    """Plain-text table of ``rows`` (dicts) in ``columns`` order; floats are pre-formatted by the caller."""
    rows = [[str(row.get(column, "")) for column in columns] for row in rows]
    widths = [max([len(column)] + [len(row[i]) for row in rows]) for i, column in enumerate(columns)]
    lines = ["  ".join(column.rjust(width) for column, width in zip(columns, widths)),
             "  ".join("-" * width for width in widths)]
    lines += ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def fmt_time(seconds: Optional[float]) -> str:
    """Seconds as a short human string in us / ms / s."""
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f}us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f}ms"
    return f"{seconds:.2f}s"


def fmt_bytes(count: Optional[int]) -> str:
    """Bytes as a short human string in KiB / MiB / GiB."""
    if count is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= scale:
            return f"{count / scale:.1f}{unit}"
    return f"{count}B"
