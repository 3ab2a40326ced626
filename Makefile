# Set-up and common tasks. `make demo` and `make test` each do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The PyTorch installed first, pinned for development and CI (the package itself asks for torch>=2.4). Plain pip gets
# the CPU build of it only from an index that offers that one (this project's machines have a local one); elsewhere
# name PyTorch's: make setup TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu (or TORCH=... for another build).
TORCH ?= torch==2.13.0
TORCH_INDEX_URL ?=

.PHONY: setup demo test bench clean

$(BIN)/bgmatte: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# PyTorch first ($(TORCH), from $(or $(TORCH_INDEX_URL),pip's configured index)), then bgmatte.
	$(BIN)/pip install --quiet $(strip $(TORCH) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)))
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/bgmatte

demo: setup
	$(BIN)/bgmatte demo --out demo --overwrite

test: setup
	$(BIN)/python -m pytest -q -n auto

clean:
	rm -rf $(VENV) demo .pytest_cache
