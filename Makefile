# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export RECSYS_HOME ?= $(CURDIR)/.recsys
# MLflow artifacts of the embedded default live in the repository's mlruns/ (git-ignored).
export RECSYS_MLFLOW_ARTIFACTS ?= $(CURDIR)/mlruns

.PHONY: install lock demo test lint format up serve consume stack-up stack-status stack-down bench clean

# The versions the tests passed with: requirements.lock (what the image runs) and
# requirements-dev.lock (the same plus the test tools), both hashed; `make lock` re-resolves them.
LOCK := requirements.lock
DEV_LOCK := requirements-dev.lock
UV_VERSION := 0.13.9
LOCK_FLAGS := --quiet --generate-hashes --universal --python-version 3.11

$(STAMP): pyproject.toml $(DEV_LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv==$(UV_VERSION)
	$(BIN)/uv pip install --python $(BIN)/python --quiet --require-hashes -r $(DEV_LOCK)
	$(BIN)/uv pip install --python $(BIN)/python --quiet --no-deps -e .
	@touch $(STAMP)

install: $(STAMP)

lock:
	@test -x $(BIN)/uv || { $(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install --quiet uv==$(UV_VERSION); }
	$(BIN)/uv pip compile pyproject.toml $(LOCK_FLAGS) -o $(LOCK)
	$(BIN)/uv pip compile pyproject.toml --extra dev $(LOCK_FLAGS) -c $(LOCK) -o $(DEV_LOCK)

demo: install
	$(BIN)/recsys demo

# The suite runs its files on both cores; TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

up: install
	$(BIN)/recsys up

serve: install
	$(BIN)/recsys serve

consume: install
	$(BIN)/recsys consume

# The production topology as local processes on this machine's PostgreSQL and Redis
# (RECSYS_STACK_POSTGRES_URL, RECSYS_STACK_REDIS_URL, RECSYS_STACK_BASE_PORT; see README).
stack-up: install
	$(BIN)/recsys stack up

stack-status: install
	$(BIN)/recsys stack status

stack-down: install
	$(BIN)/recsys stack down

bench: install
	$(BIN)/python benchmarks/accuracy.py

clean:
	rm -rf .recsys .pytest_cache .ruff_cache
