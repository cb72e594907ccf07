# The README's commands. Each one does the whole set-up it needs on a fresh machine:
# .venv (if missing) -> pinned dependencies -> the C++ extension -> the job.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
EXTENSION := torch_qwen_fused/_C.stamp
CSRC := $(shell find csrc -name "*.cpp" -o -name "*.h") setup.py

.PHONY: setup lint format test test-pypto demo bench bench-op bench-decode bench-ttft bench-batch bench-varlen bench-pypto clean

setup: $(EXTENSION)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, from its pin: a looser request would pull a multi-GB CUDA build.
$(DEPS_STAMP): requirements-dev.txt | $(PY)
	@echo "== installing pinned dependencies into $(VENV)"
	$(PY) -m pip install --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --disable-pip-version-check -r requirements-dev.txt
	touch $@

# An editable install, built against the venv's torch (no build isolation): _C lands in the tree.
$(EXTENSION): $(DEPS_STAMP) $(CSRC)
	@echo "== building torch_qwen_fused._C with -O3 -fopenmp (about a minute on 2 cores)"
	$(PY) -m pip install --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

# Python (ruff, configured in pyproject.toml) and C++ (clang-format, .clang-format).
lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/clang-format --dry-run --Werror $(shell find csrc -name "*.cpp" -o -name "*.h")

format: $(DEPS_STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/clang-format -i $(shell find csrc -name "*.cpp" -o -name "*.h")

test: lint setup
	$(PY) -m pytest -q -ra

# Every pypto CPU-replay case (seconds each).
test-pypto: setup
	$(PY) -m pytest -q -ra -m pypto_full tests/test_pypto.py

demo: setup
	$(PY) -m torch_qwen_fused.demo

bench: bench-op bench-decode bench-ttft bench-batch bench-varlen

bench-op: setup
	$(PY) -m benchmarks.bench_op

bench-decode: setup
	$(PY) -m benchmarks.bench_decode

# Time to first token, stock vs patched (2 layers of the 0.6B shape: a 28-layer prefill of 4 x 8192 tokens takes
# most of an hour here).
bench-ttft: setup
	$(PY) -m benchmarks.bench_decode --measure ttft --presets 0.6b -L 128,2048,8192 --layers 2 --reps 3 --dtype float32

# HF continuous batching (generate_batch), stock vs patched: about 20 minutes per rep here.
bench-batch: setup
	$(PY) -m benchmarks.bench_batch

bench-varlen: setup
	$(PY) -m benchmarks.bench_varlen

bench-pypto: setup
	$(PY) -m benchmarks.bench_pypto_costmodel

clean:
	rm -rf build torch_qwen_fused/_C*.so $(EXTENSION)

# `DEBUG=1 make setup` after `make clean`: the extension without optimisation, with symbols (setup.py).
