# Set-up and common tasks. `make demo`, `make test` and `make bench` each do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The PyTorch installed first, pinned for development and CI (the package itself asks for torch>=2.4). Plain pip gets
# the CPU build of it only from an index that offers that one (this project's machines have a local one); elsewhere
# name PyTorch's: make setup TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu (or TORCH=... for another build).
TORCH ?= torch==2.13.0
TORCH_INDEX_URL ?=
# What `make bench` passes to `bgmatte bench`: the fast path against the plain module, random MobileNetV2 weights, at
# 720p (about 40 seconds on 2 cores). BENCH="--pipeline --resolution 720p" times `bgmatte video` end to end instead.
BENCH ?= --resolution 720p

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

bench: setup
	$(BIN)/bgmatte bench $(BENCH)

test: setup
	$(BIN)/python -m pytest -q -n auto

clean:
	rm -rf $(VENV) demo .pytest_cache
