# `make install` builds .venv from nothing; every other target installs first if needed.
# Pick the torch build with TORCH_INDEX, e.g. the CPU-only wheels:
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_INDEX ?=
# faiss's CPU or GPU build (alternatives: they install the same module).
FAISS ?= cpu
STAMP := $(VENV)/.installed

.PHONY: install test lint format demo imagenette bench bench-memory clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
ifneq ($(TORCH_INDEX),)
	$(BIN)/python -m pip install --index-url $(TORCH_INDEX) torch torchvision
endif
	$(BIN)/python -m pip install -e '.[$(FAISS),dev,ray,bench]'
	touch $@

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q tests/test_layering.py  # import-linter's layer contracts

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: install
	$(BIN)/retrieve demo

imagenette: install
	bash bench/imagenette.sh

bench: install
	$(BIN)/python bench/extract.py
	$(BIN)/python bench/search.py

bench-memory: install
	$(BIN)/python bench/memory.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info demo-out imagenette-out bench-out .retrieve
