# The two commands a newcomer runs: `make train` (tiny end-to-end pretraining on CPU) and `make test`.
# Each sets up .venv on first use: torch 2.13.0 first (CPU build here, CUDA build on a GPU cluster), then the rest.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# DeepSpeed compiles its C++ ops on first start; keep them across runs. Builds depend on the venv's include paths,
# so the cache is keyed by checkout path (two clones sharing one directory would rebuild each other's ops).
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/nopetrain/torch_extensions/$(shell printf '%s' '$(CURDIR)' | md5sum | cut -c1-12)
export WANDB_MODE ?= offline
RUN ?= demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: train test lint install slurm-deps clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

DATA := data/default

$(DATA)/corpus.json: | $(STAMP)
	$(PY) -m nopetrain.data_pipelines build-default --output $(DATA)

train: $(STAMP) $(DATA)/corpus.json
	$(PY) train.py run.name=$(RUN) curriculum=demo steps=400 log_every=25 checkpoint.every=200

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint Dockerfile

# A real one-node SLURM for tests/test_slurm.py (Debian, as root; the tests skip without it).
slurm-deps:
	apt-get update
	apt-get install -y slurmctld slurmd slurm-client munge

clean:
	rm -rf runs outputs multirun .pytest_cache
