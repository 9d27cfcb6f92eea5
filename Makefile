# `make train` / `make test` create .venv if absent and install the project into it.
PYTHON ?= python3
VENV ?= .venv
# Override for a CUDA build, e.g. make train TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.txl-installed

.PHONY: install train test test-fast bench longrange clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev,peer]"
	touch $(STAMP)

install: $(STAMP)

train: install
	$(BIN)/txl-train $(ARGS)

# The paper's RECL comparison at small scale (scripts/longrange_demo.py; docs/metrics.md), e.g. ARGS="--steps 1000"
longrange: install
	$(BIN)/python scripts/longrange_demo.py $(ARGS)

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf outputs multirun wandb lightning_logs .pytest_cache
