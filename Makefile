# Set-up and common tasks. `make demo` and `make test` each do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

$(BIN)/bgmatte: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of PyTorch, pinned for development and CI; the package itself asks for torch>=2.4.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/bgmatte

demo: setup
	$(BIN)/bgmatte demo --out demo --overwrite

test: setup
	$(BIN)/python -m pytest -q -n auto

clean:
	rm -rf $(VENV) demo .pytest_cache
