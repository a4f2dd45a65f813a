# The two commands a newcomer types: `make demo` and `make test`.
# Both create .venv and install what they need; nothing is installed by hand.

PYTHON ?= python3.11
VENV   ?= .venv
# torch goes in first, pinned, and is never resolved by pip from the project's dependencies (an
# unpinned torch pulls a multi-GB CUDA build). Which build `torch==2.13.0` gives depends on the
# index: PyPI's Linux x86_64 wheel is the CUDA 13.0 build, except on this project's dev/CI machines,
# where pip finds the CPU build on disk first. Choose explicitly with TORCH_INDEX:
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu     # CPU build anywhere
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cu126   # CUDA 12.6 (driver >= 525)
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cu130   # CUDA 13.0 (driver >= 580)
# torch 2.13 has no cu128 build. Changing TORCH, TORCHVISION or TORCH_INDEX reinstalls both.
TORCH       ?= torch==2.13.0
# The torchvision release built for that torch (0.26 = 2.11, 0.27 = 2.12, 0.28 = 2.13); test-only.
TORCHVISION ?= torchvision==0.28.0
TORCH_INDEX ?=
UV_VERSION  ?= 0.13.8
# `make lock LOCK_FLAGS=--upgrade` moves every pin to the newest release the bounds allow.
LOCK_FLAGS  ?=
# Two pytest workers; the server tests run in two groups, one per worker (tests/conftest.py).
# TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
XDIST       = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS))
# `make serve` serves the registered model from this tracking store (the demo's by default).
MLFLOW_TRACKING_URI ?= sqlite:///mlruns.db

PY          := $(VENV)/bin/python
TORCH_SPEC  := $(VENV)/.torch-spec
TORCH_STAMP := $(VENV)/.torch-installed
STAMP       := $(VENV)/.installed
INDEX_ARGS  := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))

# Telemetry off: these machines (and CI) have no network.
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

.PHONY: help install demo test test-slow test-fast bench bench-gpu model-table ui serve lock clean FORCE

help:
	@echo "make demo      - generate data, train the small 2-tower AlexNet on local Ray, log to MLflow"
	@echo "make test      - the test suite (unit, multi-process, Ray/MLflow/S3 integration, Helm), without \`slow\`"
	@echo "make test-slow - the tests marked slow (more learning-curve seeds, the 4x2 tower layout, Inductor compiles); CI runs both"
	@echo "make test-fast - the inner loop: no Ray, no servers, nothing slow"
	@echo "make bench     - CPU benchmarks: towers vs reference, input pipeline, planning at scale, 90-epoch projection"
	@echo "make bench-gpu - the GPU benchmark (bench/gpu.sh; on a machine with a CUDA GPU)"
	@echo "make ui        - open the MLflow UI on the local tracking store"
	@echo "make serve     - serve the registered model alexnet@best on http://127.0.0.1:5001"
	@echo "make lock      - re-resolve constraints.txt from pyproject.toml (uv pip compile)"

# Rewritten only when the torch choice changes, so the torch install reruns exactly then.
$(TORCH_SPEC): FORCE
	@mkdir -p $(VENV)
	@echo '$(TORCH) $(TORCHVISION) $(TORCH_INDEX)' | cmp -s - $@ || echo '$(TORCH) $(TORCHVISION) $(TORCH_INDEX)' > $@

# torchvision with --no-deps: it pins one torch release and must never replace the one above.
$(TORCH_STAMP): $(TORCH_SPEC)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip uninstall -q -y torch torchvision
	$(PY) -m pip install -q $(TORCH) $(INDEX_ARGS)
	$(PY) -m pip install -q --no-deps $(TORCHVISION) $(INDEX_ARGS)
	touch $@

$(STAMP): $(TORCH_STAMP) pyproject.toml constraints.txt
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m service.train experiment=demo

test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=25 $(XDIST) -m "not slow" tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -ra -m slow tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra $(XDIST) -m "not integration and not slow" tests

bench: $(STAMP)
	$(PY) bench/towers_cpu.py
	$(PY) bench/input_pipeline.py
	$(PY) bench/plan_scale.py
	$(PY) bench/project.py

# Needs a CUDA GPU and torch; see bench/gpu.sh for what it measures.
bench-gpu:
	bash bench/gpu.sh

model-table: $(STAMP)
	$(PY) -m service.model

ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlruns.db --host 127.0.0.1 --port 5000

# The venv's bin/ on PATH: the scoring server is started as `uvicorn` from a shell.
serve: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" MLFLOW_TRACKING_URI=$(MLFLOW_TRACKING_URI) \
	  $(VENV)/bin/mlflow models serve -m models:/alexnet@best --env-manager local --host 127.0.0.1 --port 5001

# constraints.txt: every dependency of pyproject.toml (all extras) pinned for CPython 3.11 on Linux,
# except torch and torchvision (pinned above, per build). Installs use it as a pip constraints file.
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "uv==$(UV_VERSION)"
	printf 'torch\ntorchvision\n' > $(VENV)/lock-excludes.txt
	$(VENV)/bin/uv pip compile pyproject.toml --all-extras --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --excludes $(VENV)/lock-excludes.txt \
	  --custom-compile-command "make lock" $(LOCK_FLAGS) -o constraints.txt

clean:
	rm -rf outputs multirun mlruns mlartifacts mlruns.db checkpoints data
