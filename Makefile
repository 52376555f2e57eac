# The README's two commands:  `make quickstart`  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup quickstart test lint bench

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

setup: $(BIN)/python
	# torch first, pinned: any other spec pulls the CUDA build (gigabytes)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"

quickstart: setup
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/medsynth run configs/quickstart.yaml --out runs

test:
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check medsynth pipelines tests benchmarks

bench:
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b; done
