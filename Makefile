# Two commands: `make demo` (train and segment on generated phantoms) and `make test`.
# Both create .venv on first use: PyTorch is installed first and pinned, so that no other
# package can pull a different (multi-gigabyte CUDA) build; then this package with its extras.
# Benchmarks have their own environment, .venv-bench, so that MONAI and nnU-Net never land in
# the one the tests run in.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
BENCH_VENV := .venv-bench
BENCH_BIN := $(BENCH_VENV)/bin
TORCH := torch==2.13.0

.PHONY: demo test bench bench-venv bench-accuracy venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-%: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[$*]"
	touch $@

venv: $(VENV)/.installed-test

demo: $(VENV)/.installed-test
	$(BIN)/unet3d-segmenter demo --output demo-output

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

$(BENCH_BIN)/python:
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_BIN)/python -m pip install --quiet --upgrade pip

# torch is named again beside the extra: the resolver then keeps 2.13.0 (or fails) rather than
# fetch another build for a package that asks for torch (nnunetv2 does).
$(BENCH_VENV)/.installed: $(BENCH_BIN)/python pyproject.toml
	$(BENCH_BIN)/python -m pip install --quiet $(TORCH)
	$(BENCH_BIN)/python -m pip install --quiet -e ".[bench]" $(TORCH)
	touch $@

bench-venv: $(BENCH_VENV)/.installed

bench: $(BENCH_VENV)/.installed
	$(BENCH_BIN)/python bench/inference.py
	$(BENCH_BIN)/python bench/training.py

# Our trainer, MONAI's tutorial recipe and nnU-Net, 30 minutes each, one after the other
# (about 95 minutes in all): run it alone on the machine.
bench-accuracy: $(BENCH_VENV)/.installed
	$(BENCH_BIN)/python bench/accuracy.py --budget-minutes 30

clean:
	rm -rf $(VENV) $(BENCH_VENV) demo-output
