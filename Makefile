# The two commands a newcomer runs: `make train` (tiny end-to-end pretraining on CPU) and `make test`.
# Each sets up .venv on first use from requirements-lock.txt, the exact versions the suite passed on: torch first
# (CPU build here, CUDA build on a GPU cluster), then the rest. `make test-latest` tries the newest versions instead.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements-lock.txt
# DeepSpeed compiles its C++ ops on first start; keep them across runs. Builds depend on the venv's include paths,
# so the cache is keyed by checkout path (two clones sharing one directory would rebuild each other's ops).
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/nopetrain/torch_extensions/$(shell printf '%s' '$(CURDIR)' | md5sum | cut -c1-12)
export WANDB_MODE ?= offline
RUN ?= demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: train test test-device-triton device-wheels test-latest lock lint install slurm-deps clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip setuptools wheel
	$(PY) -m pip install -q -c $(LOCK) torch
	$(PY) -m pip install -q -c $(LOCK) -e '.[dev,slurm]'
	$(PY) -m pip check
	touch $(STAMP)

install: $(STAMP)

DATA := data/default

$(DATA)/corpus.json: | $(STAMP)
	$(PY) -m nopetrain.data_pipelines build-default --output $(DATA)

train: $(STAMP) $(DATA)/corpus.json
	$(PY) train.py run.name=$(RUN) curriculum=demo steps=400 log_every=25 checkpoint.every=200

# Two workers, a file to each at a time (tests/conftest.py hands out the longest first): most of the suite is
# multi-process runs whose start-up is single-threaded, which leaves one of two cores idle when run serially.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile
	$(MAKE) --no-print-directory test-device-triton

# The GPU machines lent to this project run Triton 3.6.0 (their image's), not the lock's: the kernels' ahead-of-time
# compile test (sm_80/sm_90, spills, registers) runs under it too. Triton alone, 190 MB, in a folder put first on the
# path of this venv's interpreter (torch stays the lock's); about 30 s.
DEVICE_TRITON := 3.6.0
DEVICE_TRITON_DIR := .venv-triton-$(DEVICE_TRITON)

$(DEVICE_TRITON_DIR)/.installed: | $(STAMP)
	$(PY) -m pip install -q --no-deps --target $(DEVICE_TRITON_DIR) triton==$(DEVICE_TRITON)
	touch $@

test-device-triton: $(DEVICE_TRITON_DIR)/.installed
	PYTHONPATH=$(DEVICE_TRITON_DIR) $(PY) -c 'import triton; assert triton.__version__ == "$(DEVICE_TRITON)", triton.__version__'
	PYTHONPATH=$(DEVICE_TRITON_DIR) $(PY) -m pytest -q -p no:cacheprovider tests/test_kernel_compile.py

# The wheels a lent GPU machine needs beside its image (benchmarks/gpu_check.sh installs them from .whl/): every
# requirement of pyproject.toml the image lacks, with their own, at this venv's versions.
device-wheels: $(STAMP)
	../shared/tools/device-wheels.sh $(PY) .whl $$($(PY) -c 'import re, tomllib; \
		print(" ".join(re.match(r"[A-Za-z0-9_.-]+", d)[0] for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')

# The newest versions pyproject.toml allows, in .venv-latest: which packages moved and which tests each one breaks.
# TESTS narrows the run, e.g. `make test-latest TESTS=tests/test_export.py`.
test-latest:
	$(PYTHON) tools/deps.py latest $(TESTS)

# Re-resolve the newest versions into requirements-lock.txt (HOLD="transformers==5.23.0" keeps one back), then
# `make test` on them before committing the lock.
lock:
	$(PYTHON) tools/deps.py lock $(foreach pin,$(HOLD),--hold $(pin))

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint Dockerfile

# A real one-node SLURM for tests/test_slurm.py (Debian, as root; the tests skip without it).
slurm-deps:
	apt-get update
	apt-get install -y slurmctld slurmd slurm-client munge

clean:
	rm -rf runs outputs multirun .pytest_cache $(DEVICE_TRITON_DIR)
