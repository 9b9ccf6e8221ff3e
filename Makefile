# Two commands do everything on a fresh machine (Python 3.11 + pip, package registry only):
#   make demo   create .venv if missing, install, run the whole pipeline on the demo default
#   make test   install the dev extras if missing, run the test suite
#   make test-faults   the fault-injection tests (killed workers, drivers, replicas); CI runs both
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch must be the CPU build on CPU machines: use this machine's wheelhouse when it has the
# file, else PyTorch's CPU index. Any other route to `torch` pulls a multi-GB CUDA build.
TORCH_WHEEL := $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl)
TORCH_SRC   := $(if $(TORCH_WHEEL),--find-links /opt/wheels,--index-url https://download.pytorch.org/whl/cpu)

.PHONY: demo test test-faults lint clean bench-data
.DEFAULT_GOAL := demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0" $(TORCH_SRC)
	touch $@

$(VENV)/.base: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.base
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.base
	$(BIN)/steelworks demo

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q -m "not faults"

# Slow on purpose: each test kills something (a Ray Data worker, a train worker, the driver,
# a Serve replica) and waits for the platform to recover.
test-faults: $(VENV)/.dev
	$(BIN)/python -m pytest -q -m faults

$(VENV)/.bench: pyproject.toml $(VENV)/.base
	$(BIN)/pip install -q -e '.[bench]'
	touch $@

# Data pipeline vs datatrove on ~100 MB of the shared corpus samples (see benchmarks/RESULTS.md).
bench-data: $(VENV)/.bench
	$(BIN)/python benchmarks/data_pipeline.py --mb 100

lint: $(VENV)/.dev
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache .ruff_cache
