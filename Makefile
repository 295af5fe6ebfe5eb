# make test / make bench on a fresh machine: create .venv (pinned torch + tools) if it is missing,
# build the extension in place, run. On a machine that already has torch (a GPU box), pass the
# interpreter instead: make test PYTHON=python3 (no venv is created, nothing is downloaded).

VENV        ?= .venv
TORCH_PIN   ?= torch==2.14.1
# The CUDA 13.0 toolkit that torch 2.14.1 (cu130) was built with; unused when absent.
CUDA_HOME   ?= $(firstword $(wildcard /usr/local/cuda-13.0 /usr/local/cuda))
PYTHON      ?= $(VENV)/bin/python
GPU_OUT     ?= gpu-check-results
export CUDA_HOME

.PHONY: test bench build lint gpu-check clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install "$(TORCH_PIN)" -r requirements-dev.txt

# The venv is only made when PYTHON is the venv's own interpreter.
build: $(if $(filter $(VENV)/bin/python,$(PYTHON)),$(VENV)/bin/python)
	$(PYTHON) setup.py -q build_ext --inplace

test: build
	$(PYTHON) -m pytest -q tests

bench: build
	$(PYTHON) -m bench

lint: $(if $(filter $(VENV)/bin/python,$(PYTHON)),$(VENV)/bin/python)
	$(PYTHON) -m ruff check bn_cuda bench tests scripts examples setup.py
	$(PYTHON) -m ruff format --check bn_cuda bench tests scripts examples setup.py

# GPU box: build for the local GPU only, CUDA test suite, compute-sanitizer, short bench, summary.
gpu-check:
	PYTHON=$(PYTHON) OUT=$(GPU_OUT) bash scripts/gpu_check.sh

clean:
	rm -rf build bn_cuda/_C*.so
