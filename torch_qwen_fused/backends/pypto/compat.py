"""Everything that depends on pypto 0.2.0's private surface, in one place (see docs/pypto.md).

pypto is imported lazily, only by the pypto backends, because ``import pypto`` sets the root logger
to DEBUG and adds a stderr handler (we undo both). Without an NPU, pypto's SIM run mode only runs its
cost model; numbers come from its *pass-verify* interpreter, which needs two workarounds in 0.2.0:

1. ``JitCallableWrapper._setup_verify_data`` copies the inputs with ``pypto_impl.CopyToHost``, a
   no-op in the CPU runtime stub, so the interpreter sees zeros and the caller's tensors come back
   zeroed. ``replay_verify_data`` registers the caller's own CPU tensors with
   ``pypto_impl.SetVerifyData`` instead, so the interpreter reads them and writes its results
   (outputs and in-place caches) straight into them.
2. ``BuildOnlineManager.build_and_load_calculator`` rebuilds the interpreter library (cmake + g++,
   30-60 s) in a fresh temp dir in every process, and replaces ``os.environ`` by a plain dict while
   doing so. ``load_calculator`` builds it once per user into ``calculator_dir()`` (under a file
   lock, saying so on stderr) and loads that copy.

pypto also writes ``./output/output_*`` (TILE_FWK_OUTPUT_DIR), ``~/.pypto`` (PYPTO_HOME) and
``~/ascend/log`` (ASCEND_PROCESS_LOG_PATH) on every call: ``sandbox()`` points them at a temp dir
and removes it afterwards.

All of this is pinned to pypto 0.2.0: ``import_pypto`` refuses any other version.
"""

import atexit
import contextlib
import ctypes
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

PYPTO_VERSION = "0.2.0"
CACHE_ENV = "TORCH_QWEN_FUSED_CACHE"

# Where pypto 0.2.0 writes files, by environment variable.
_OUTPUT_ENV = {
    "TILE_FWK_OUTPUT_DIR": "output",
    "PYPTO_HOME": "pypto_home",
    "ASCEND_PROCESS_LOG_PATH": "ascend_log",
    "ASCEND_WORK_PATH": "ascend_work",
}

_pypto = None
_calculator_loaded = False


def pypto_version() -> str:
    """Installed pypto version, or "" if pypto is not installed (does not import it)."""
    try:
        return metadata.version("pypto")
    except metadata.PackageNotFoundError:
        return ""


def import_pypto():
    """Import pypto 0.2.0 (once), leaving the root logger as it was. ImportError otherwise."""
    global _pypto
    if _pypto is not None:
        return _pypto
    version = pypto_version()
    if not version:
        raise ImportError("the pypto backend needs pypto==0.2.0: pip install 'torch_qwen_fused[pypto]'")
    if version != PYPTO_VERSION:
        raise ImportError(f"the pypto backend is pinned to pypto=={PYPTO_VERSION} (it uses private "
                          f"pypto APIs, see torch_qwen_fused/backends/pypto/compat.py), found pypto=={version}")
    # pypto's logger picks its log dir once, when its libraries load (default ~/ascend/log): give it
    # a per-process temp dir, removed at exit, unless the user chose one.
    with process_dirs():
        with restored_root_logger():
            import pypto
    _pypto = pypto
    return pypto


_process_dir = None


@contextlib.contextmanager
def process_dirs():
    """Point pypto's dirs (those the user has not set) at one temp dir of this process, removed at
    exit: for what must outlive a call (pypto's log dir, latched at import; the NPU kernel's
    compile output)."""
    global _process_dir
    if _process_dir is None:
        _process_dir = tempfile.mkdtemp(prefix="torch_qwen_fused_pypto_process_")
        atexit.register(shutil.rmtree, _process_dir, True)
    saved = {name: os.environ.get(name) for name in _OUTPUT_ENV}
    for name, sub in _OUTPUT_ENV.items():
        if not saved[name]:
            os.environ[name] = os.path.join(_process_dir, sub)
    try:
        yield _process_dir
    finally:
        _restore_env(saved)


def _restore_env(saved: dict) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@contextlib.contextmanager
def restored_root_logger():
    """pypto's calls may reconfigure the root logger too; put it back afterwards."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        yield
    finally:
        root.setLevel(level)
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)


@contextlib.contextmanager
def sandbox():
    """Point pypto's output, home and log dirs at a fresh temp dir; remove it afterwards.

    Yields the temp dir (the cost-model benchmark reads its swim-lane output from there).
    """
    tmp = tempfile.mkdtemp(prefix="torch_qwen_fused_pypto_")
    saved = {name: os.environ.get(name) for name in _OUTPUT_ENV}
    try:
        for name, sub in _OUTPUT_ENV.items():
            os.environ[name] = os.path.join(tmp, sub)
        with restored_root_logger():
            yield tmp
    finally:
        _restore_env(saved)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def captured_output(directory: str):
    """Send fds 1 and 2 to a file in ``directory`` while active (pypto's compile and cost-model
    post-processing print pages of progress and harmless ``matplotlib`` tracebacks); on an
    exception, the tail of what was printed goes to stderr before it propagates."""
    path = os.path.join(directory, "pypto_console.log")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    failed = False
    try:
        with open(path, "wb") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                yield path
            except BaseException:
                failed = True
                raise
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)
        if failed and os.path.exists(path):
            with open(path, "rb") as log:
                tail = log.read()[-6000:].decode(errors="replace")
            print(f"--- pypto output (tail) ---\n{tail}\n---", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """Per-user cache dir of this package: $TORCH_QWEN_FUSED_CACHE, else $XDG_CACHE_HOME or ~/.cache."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torch_qwen_fused"


def calculator_dir() -> Path:
    """Where the interpreter library for this pypto/torch/compiler ABI lives."""
    import torch

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    python = f"{sys.version_info[0]}{sys.version_info[1]}"
    return cache_root() / f"pypto-{PYPTO_VERSION}-calculator-torch{torch.__version__}-abi{abi}-py{python}"


def _build_calculator(dest: Path) -> None:
    """cmake + g++ build of pypto's lib/calculator against the installed torch, installed into dest."""
    import torch

    cmake = shutil.which("cmake")
    if cmake is None:
        raise RuntimeError("the pypto CPU replay needs cmake and a C++17 compiler to build pypto's "
                           "interpreter library once (apt-get install cmake g++)")
    pypto_dir = Path(metadata.distribution("pypto").locate_file("pypto")).resolve()
    src = pypto_dir / "lib" / "calculator"
    torch_root = Path(torch.__file__).parent
    with tempfile.TemporaryDirectory(prefix="torch_qwen_fused_calc_") as tmp:
        build = Path(tmp) / "build"
        staging = Path(tmp) / "install"
        steps = [
            [cmake, "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
             f"-DCMAKE_INSTALL_PREFIX={staging}",
             f"-DPY3_MOD_TORCH_VERSION={torch.__version__}",
             f"-DPY3_MOD_TORCH_ROOT_PATH={torch_root}",
             f"-DPY3_MOD_TORCH_C_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"],
            [cmake, "--build", str(build), "-j", str(max(1, min(4, os.cpu_count() or 1)))],
            [cmake, "--install", str(build), "--prefix", str(staging)],
        ]
        for step in steps:
            result = subprocess.run(step, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"building pypto's interpreter library failed: {' '.join(step)}\n"
                                   f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        built = staging / "lib" / "libtile_fwk_calculator.so"
        if not built.exists():
            raise RuntimeError(f"building pypto's interpreter library produced no {built.name}")
        dest.mkdir(parents=True, exist_ok=True)
        partial = dest / (built.name + ".partial")
        shutil.copy2(built, partial)
        os.replace(partial, dest / built.name)


def load_calculator() -> None:
    """Build (once per user cache dir) and load pypto's interpreter library; mark it loaded for pypto."""
    global _calculator_loaded
    if _calculator_loaded:
        return
    import_pypto()
    dest = calculator_dir()
    lib = dest / "libtile_fwk_calculator.so"
    if not lib.exists():
        dest.mkdir(parents=True, exist_ok=True)
        with open(dest / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not lib.exists():
                print(f"torch_qwen_fused: building pypto's CPU interpreter library once into {dest} "
                      f"(cmake + g++, 30-60 s)...", file=sys.stderr, flush=True)
                _build_calculator(dest)
                print("torch_qwen_fused: pypto interpreter library built.", file=sys.stderr, flush=True)
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    # pypto's own loader would rebuild it in a temp dir; tell it it is already there.
    from pypto._utils import BuildOnlineManager

    BuildOnlineManager().calculator_loaded = True
    _calculator_loaded = True


@contextlib.contextmanager
def replay_verify_data():
    """While active, jit kernels in SIM mode with pass-verify interpret the caller's own CPU tensors.

    Replaces ``JitCallableWrapper._setup_verify_data`` (whose CopyToHost is a no-op without CANN)
    with a registration of the tensors themselves; restores it on exit.
    """
    pypto = import_pypto()
    from pypto import pypto_impl
    from pypto.frontend.parser import entry

    load_calculator()
    wrapper = entry.JitCallableWrapper
    original = wrapper.__dict__["_setup_verify_data"]

    def _setup_verify_data(pto_tensors) -> None:
        if not pypto.get_verify_options().get("enable_pass_verify"):
            return
        pypto_impl.SetVerifyData(entry._pto_to_tensor_data(pto_tensors), [], [])

    wrapper._setup_verify_data = staticmethod(_setup_verify_data)
    try:
        yield
    finally:
        wrapper._setup_verify_data = original


# The verify options that make a SIM run interpret the graph (no per-pass dumps, no tensor dumps).
REPLAY_VERIFY_OPTIONS = {
    "enable_pass_verify": True,
    "pass_verify_pass_filter": [],
    "pass_verify_save_tensor": False,
}
