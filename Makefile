# The README's two commands:  `make quickstart`  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup quickstart test test-defaults lint bench

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# nnU-Net (the dataset's client, used by tests/test_nnunet.py) needs timm -> torchvision: installed in one call
# with torch and torchvision pinned, torch stays the CPU 2.13.0 (unpinned: a 6 GB CUDA torch replaces it).
NNUNET_PINS := torch==2.13.0 torchvision==0.28.0 nnunetv2==2.8.1

setup: $(BIN)/python
	# torch first, pinned: any other spec pulls the CUDA build (gigabytes)
	$(BIN)/pip install --quiet $(NNUNET_PINS)
	$(BIN)/pip install --quiet -e ".[dev]"
	# unittest2 (via batchgenerators) pulls the PyPI "argparse" 1.4 backport, whose argparse.py shadows the
	# standard library's in some subprocesses (Prefect's server fails to start): the stdlib one is enough
	$(BIN)/pip uninstall --quiet --yes argparse

quickstart: setup
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/medsynth run configs/quickstart.yaml --out runs --overwrite

test:
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -q -n 2 --dist loadgroup

# every sampling family's default config on the phantom, the slow fits included (tens of minutes on 2 cores;
# `make test` runs only the fast ones)
test-defaults:
	MEDSYNTH_RUN_SLOW=1 $(BIN)/python -m pytest -q -n 2 tests/test_defaults.py

lint:
	$(BIN)/ruff check medsynth pipelines tests benchmarks

bench:
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b; done
