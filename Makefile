# `make train` creates .venv (the user's environment: txl and its locked dependencies, no test tools);
# `make test` creates .venv-test (the same plus pytest, tensorboard and the Hugging Face peer, whose old
# pins must not reach the user's environment). Both install exact versions from the lock files.
PYTHON ?= python3
VENV ?= .venv
TEST_VENV ?= .venv-test
# Override for a CUDA build, e.g. make train TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
# `make lock` resolves against this torch (the CPU wheel: no CUDA packages in the lock; torch itself is not
# locked, TORCH installs it) and these pip options (e.g. LOCK_PIP_ARGS="--extra-index-url URL" for it).
LOCK_TORCH ?= torch==2.13.0+cpu
LOCK_PIP_ARGS ?=
BIN := $(VENV)/bin
TEST_BIN := $(TEST_VENV)/bin
STAMP := $(VENV)/.txl-installed
TEST_STAMP := $(TEST_VENV)/.txl-test-installed

.PHONY: install install-test train test test-fast bench longrange lock clean

# torch first (TORCH may point at another index), then the lock, then txl itself without resolving again
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(TEST_STAMP): pyproject.toml requirements-test.lock
	test -x $(TEST_BIN)/python || $(PYTHON) -m venv $(TEST_VENV)
	$(TEST_BIN)/pip install -q $(TORCH)
	$(TEST_BIN)/pip install -q -r requirements-test.lock
	$(TEST_BIN)/pip install -q --no-deps -e .
	touch $@

install: $(STAMP)

install-test: $(TEST_STAMP)

train: install
	$(BIN)/txl-train $(ARGS)

# The paper's RECL comparison at small scale (scripts/longrange_demo.py; docs/metrics.md), e.g. ARGS="--steps 1000"
longrange: install
	$(BIN)/python scripts/longrange_demo.py $(ARGS)

# One pytest-xdist worker per usable core (PYTEST_WORKERS=0: in-process), a test file per worker
# (module fixtures are built once); tests/conftest.py gives each worker its share of the threads.
PYTEST_WORKERS ?= auto
test: install-test
	$(TEST_BIN)/python -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: install-test
	$(TEST_BIN)/python -m pytest -q -m "not slow" -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: install-test
	$(TEST_BIN)/python scripts/bench.py --all

# Re-resolve both lock files from pyproject.toml (needs the package index; a few minutes).
lock:
	test -x .venv-lock/bin/pip-compile || ($(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install -q pip-tools)
	echo "$(LOCK_TORCH)" > .venv-lock/torch.txt
	.venv-lock/bin/pip-compile -q --strip-extras --no-emit-find-links --no-emit-index-url --no-emit-trusted-host \
	    --unsafe-package torch -c .venv-lock/torch.txt --custom-compile-command "make lock" \
	    $(if $(LOCK_PIP_ARGS),--pip-args "$(LOCK_PIP_ARGS)") -o requirements.lock pyproject.toml
	.venv-lock/bin/pip-compile -q --strip-extras --no-emit-find-links --no-emit-index-url --no-emit-trusted-host \
	    --unsafe-package torch -c .venv-lock/torch.txt --custom-compile-command "make lock" \
	    $(if $(LOCK_PIP_ARGS),--pip-args "$(LOCK_PIP_ARGS)") --extra dev --extra peer -o requirements-test.lock pyproject.toml

clean:
	rm -rf outputs multirun wandb lightning_logs .pytest_cache
