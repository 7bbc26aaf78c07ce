# Two commands for a fresh machine (README.md):
#   make demo   set up .venv and run the main job: train and evaluate on synthetic data (harmonizer-fast demo)
#   make test   set up .venv, compile-check the CUDA sources and the Triton plans for sm_80-90, lint, run the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned: a torch requirement left open pulls a multi-GB CUDA build onto a CPU machine.
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/include/*)

.PHONY: demo test setup bench compile-check gpucheck lint backends clean

setup: $(VENV)/.deps $(VENV)/.ext

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" "setuptools>=77,<81" wheel ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test]" "torch==$(TORCH_VERSION)"
	touch $@ $(VENV)/.ext  # the editable install above just built the extension

# Rebuild the extension (editable install) whenever its sources change.
$(VENV)/.ext: $(VENV)/.deps setup.py $(EXT_SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: setup
	$(VENV)/bin/harmonizer-fast demo --out runs/demo

# Every benchmark and the profiler, one report with charts: benchmarks/results/bench-<device>.md
bench: setup
	$(VENV)/bin/harmonizer-fast bench

compile-check: $(VENV)/.deps
	bash csrc/compile_check.sh $(PY)

# Every Triton launch plan compiled ahead of time for sm_80/86/89/90 (no GPU needed; cached in build/gpucheck).
gpucheck: setup compile-check
	$(PY) -m harmonizer_fast.gpucheck

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .

backends: setup
	$(PY) -m harmonizer_fast

test: setup compile-check gpucheck lint
	$(PY) -m harmonizer_fast
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf build *.egg-info harmonizer_fast/_C*.so .pytest_cache .hypothesis
