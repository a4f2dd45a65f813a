# The two commands a newcomer types: `make demo` and `make test`.
# Both create .venv and install what they need; nothing is installed by hand.

PYTHON ?= python3.11
VENV   ?= .venv
# Pinned so pip takes the CPU build; an unpinned torch pulls a multi-GB CUDA
# build. On a GPU machine: make TORCH="torch==2.13.0 --index-url <cuda index>"
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Telemetry off: these machines (and CI) have no network.
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

.PHONY: help install demo test test-fast bench bench-gpu model-table ui clean

help:
	@echo "make demo   - generate data, train the small 2-tower AlexNet on local Ray, log to MLflow"
	@echo "make test   - the whole test suite (unit, multi-process, Ray/MLflow/S3 integration, Helm)"
	@echo "make bench  - CPU benchmarks (tower-parallel vs reference, input pipeline)"
	@echo "make ui     - open the MLflow UI on the local tracking store"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m service.train experiment=demo

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not integration" tests

bench: $(STAMP)
	$(PY) bench/towers_cpu.py
	$(PY) bench/input_pipeline.py

model-table: $(STAMP)
	$(PY) -m service.model

ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlruns.db --host 127.0.0.1 --port 5000

clean:
	rm -rf outputs multirun mlruns mlartifacts mlruns.db checkpoints data
