# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export RECSYS_HOME ?= $(CURDIR)/.recsys
# MLflow artifacts of the embedded default live in the repository's mlruns/ (git-ignored).
export RECSYS_MLFLOW_ARTIFACTS ?= $(CURDIR)/mlruns

.PHONY: install demo test lint format up serve consume bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv
	$(BIN)/uv pip install --python $(BIN)/python --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/recsys demo

test: install
	$(BIN)/python -m pytest

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

bench: install
	$(BIN)/python benchmarks/accuracy.py

clean:
	rm -rf .recsys .pytest_cache .ruff_cache
