# Two commands: `make demo` (train and segment on generated phantoms) and `make test`.
# Both create .venv on first use: PyTorch is installed first and pinned, so that no other
# package can pull a different (multi-gigabyte CUDA) build; then this package with its extras.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: demo test bench venv clean

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

bench: $(VENV)/.installed-bench
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/training.py

clean:
	rm -rf $(VENV) demo-output
