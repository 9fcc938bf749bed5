# The two commands a newcomer runs: `make train` (tiny end-to-end pretraining on CPU) and `make test`.
# Each sets up .venv on first use from requirements-lock.txt, the exact versions the suite passed on: torch first
# (CPU build here, CUDA build on a GPU cluster), then the rest. `make test-latest` tries the newest versions instead.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements-lock.txt
# The lent GPU machines' environment (test-device-versions below).
DEVICE_VENV := .venv-device
DEVICE_PY := $(DEVICE_VENV)/bin/python
# DeepSpeed compiles its C++ ops on first start; keep them across runs. Builds depend on the venv's include paths,
# so the cache is keyed by checkout path (two clones sharing one directory would rebuild each other's ops).
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/nopetrain/torch_extensions/$(shell printf '%s' '$(CURDIR)' | md5sum | cut -c1-12)
export WANDB_MODE ?= offline
RUN ?= demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: train test test-device-versions device-wheels test-latest lock lint install slurm-deps clean

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
test: $(STAMP) $(DEVICE_VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile
	$(MAKE) --no-print-directory test-device-versions

# The GPU machines lent to this project run their image's versions, not the lock's: requirements-device.txt (Python
# 3.12, torch 2.11's CUDA build, which runs on a CPU, Triton 3.6, transformers 5.17) with the carried wheels beside
# them, installed as benchmarks/gpu_check.sh installs them there. .venv-device is that environment (4.6 GB; about a
# minute to build); `make test` builds it first, so that tests/test_gpu_check.py's device-like interpreter sees it,
# and ends with the suite's collection and its model, kernel and ahead-of-time compile tests in it (about 2 minutes).
# The image's Python where this machine has one (pyenv keeps 3.12 here), else python3: `make` says which it took.
DEVICE_PYTHON ?= $(or $(shell for p in python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python3.12; do \
	$$p -c pass 2> /dev/null && { command -v $$p; break; }; done),$(PYTHON))
export NOPETRAIN_DEVICE_VENV := $(CURDIR)/$(DEVICE_VENV)
# Triton 3.6's interpreter takes int() of one-element arrays, which NumPy 2.4 refuses (Triton 3.7 fixed that); the
# device compiles its kernels and never interprets them, so the interpreter tests alone run with an older NumPy.

$(DEVICE_VENV)/.installed: requirements-device.txt pyproject.toml | $(STAMP)
	rm -rf $(DEVICE_VENV)
	$(DEVICE_PYTHON) -m venv $(DEVICE_VENV)
	$(DEVICE_PY) -m pip install -q -r requirements-device.txt
	$(MAKE) --no-print-directory device-wheels
	$(DEVICE_PY) -m pip install -q --no-index --no-deps --no-compile .whl/*.whl
	$(DEVICE_PY) -m pip install -q --no-index --no-deps --no-build-isolation -e .
	$(DEVICE_PY) -m pip check
	$(DEVICE_PY) -m pip install -q --no-deps --target $(DEVICE_VENV)/interpreter-numpy 'numpy<2.4'
	touch $@

test-device-versions: $(DEVICE_VENV)/.installed
	$(DEVICE_PY) -c 'import platform, torch, triton; print(f"device versions: python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}")'
	$(DEVICE_PY) -m pytest -q -p no:cacheprovider --collect-only tests | tail -n 1
	$(DEVICE_PY) -m pytest -q -p no:cacheprovider -n 2 tests/test_model.py tests/test_kernels.py \
		tests/test_linear_cross_entropy.py tests/test_kernel_compile.py tests/test_hf.py
	PYTHONPATH=$(DEVICE_VENV)/interpreter-numpy $(DEVICE_PY) -m pytest -q -p no:cacheprovider -n 2 \
		tests/test_qk_norm_rope_kernel.py

# The wheels a lent GPU machine needs beside its image (benchmarks/gpu_check.sh installs them from .whl/): every
# requirement of pyproject.toml the image lacks, with their own, at this venv's versions; none left from before.
device-wheels: $(STAMP)
	rm -rf .whl
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

# The import contracts (pyproject.toml, [tool.importlinter]) are checked on the package as it installs: kernels/,
# data_pipelines/ and launch/ sit under nopetrain/ there, which the checkout's nopetrain/ folder does not show (and
# lint-imports puts its working directory first on the path, hence the cd).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint Dockerfile
	rm -rf build/import-graph
	$(PY) -m pip install -q --no-deps --no-build-isolation --no-compile --target build/import-graph .
	cd build/import-graph && PYTHONPATH=. $(CURDIR)/$(VENV)/bin/lint-imports --no-cache $(CURDIR)/pyproject.toml

# A real one-node SLURM for tests/test_slurm.py (Debian, as root; the tests skip without it).
slurm-deps:
	apt-get update
	apt-get install -y slurmctld slurmd slurm-client munge

clean:
	rm -rf runs outputs multirun .pytest_cache $(DEVICE_VENV) .whl
