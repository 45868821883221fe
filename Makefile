# airflow-closedloop: the README's commands.
#   make demo     set up (locked deps, local Airflow + MLflow under .closedloop/) and run the periodic pipeline
#   make test     the whole test suite (what CI runs); make test-fast skips the real-scheduler tests;
#                 make test-alone runs each test module by itself
#   make airflow  Airflow UI (127.0.0.1:8080) + MLflow UI (127.0.0.1:5000) on these DAGs
#   make bench    benchmarks/ (prints figures)
#   make docs     the documentation: regenerate docs/reference/ from the code, build docs/_build/ strictly
#   make prodlike the production shape without Docker: PostgreSQL, Redis, MLflow server, Airflow + Celery
#                 workers on 127.0.0.1 (needs Debian's postgresql and redis-server)
SHELL := /bin/bash
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo .closedloop/tools/bin/uv)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast test-alone airflow prodlike bench docs lint validate clean

$(UV):
	@echo "uv not found: installing it into .closedloop/tools with pip"
	$(PYTHON) -m venv .closedloop/tools
	.closedloop/tools/bin/pip install --quiet "uv>=0.5,<1"

# --compile-bytecode: every process (each Airflow task, server, test) then loads the libraries' bytecode
# instead of compiling their sources again when Python may not write it (PYTHONDONTWRITEBYTECODE)
$(BIN)/closedloop: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --compile-bytecode --python $(PYTHON)
	@touch $@

demo: $(BIN)/closedloop
	$(BIN)/closedloop demo

test: $(BIN)/closedloop
	$(BIN)/pytest

test-fast: $(BIN)/closedloop
	$(BIN)/pytest -m "not slow"

# each test module on its own, in its own process: no module leans on another's leftovers
test-alone: $(BIN)/closedloop
	@set -e; for f in tests/unit/test_*.py tests/unit/*/test_*.py tests/integration/test_*.py; do \
	  echo "== $$f"; $(BIN)/pytest -q "$$f"; done

validate: $(BIN)/closedloop
	$(BIN)/closedloop pipelines validate

airflow: $(BIN)/closedloop
	@scripts/local-airflow.sh

prodlike: $(BIN)/closedloop
	$(BIN)/closedloop prodlike

bench: $(BIN)/closedloop
	@for b in benchmarks/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# strict: a warning (a dead link or anchor, a page outside the table of contents) fails the build
docs: $(BIN)/closedloop
	$(BIN)/python docs/generate.py
	$(BIN)/python -m sphinx -W -n --keep-going -q -b html docs docs/_build
	@echo "docs: docs/_build/index.html"

lint: $(BIN)/closedloop
	$(BIN)/ruff check src tests dags plugins benchmarks

clean:
	rm -rf .closedloop
