# CUDA image for cluster runs: PyTorch (same pin as the Makefile), DeepSpeed with its CUDA/CPU ops compiled at build
# time (no JIT compile on every node at start-up), flash-attn, and nopetrain installed. Linted by `make lint`
# (hadolint; no Docker engine is needed for that).
#   docker build -t nopetrain .
#   docker run --gpus all --ipc=host -v "$PWD/runs:/workspace/runs" nopetrain \
#       launch/torchrun.sh model=smollm_360m precision=bf16
# On SLURM with enroot/pyxis: nopetrain-slurm --container-image=... (see docs/cluster.md).
# The CUDA of the locked torch's wheel (requirements-lock.txt: cuda-toolkit==13.0.x): DeepSpeed's ops and flash-attn
# compile here with this nvcc for that torch, and both refuse another major version (tests/test_dockerfile.py).
FROM nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    TORCH_CUDA_ARCH_LIST="8.0;9.0" \
    MAX_JOBS=8

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The base image's Ubuntu release fixes these packages' versions; pinning them too would break each time Ubuntu
# ships a security update, so DL3008 is off for this line.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev python3-venv git ninja-build libaio-dev \
    && rm -rf /var/lib/apt/lists/*

# Every version comes from requirements-lock.txt, the environment the test suite passed on (as `make` installs it).
WORKDIR /workspace
COPY requirements-lock.txt ./
ENV PIP_CONSTRAINT=/workspace/requirements-lock.txt
# DL3013 (pin versions in pip): PIP_CONSTRAINT pins every package installed here and below.
# hadolint ignore=DL3013
RUN python3 -m venv "$VIRTUAL_ENV" && pip install pip setuptools wheel && pip install torch

# DeepSpeed with fused Adam, CPU Adam (ZeRO-Offload) and async I/O built ahead of time; flash-attn compiled against
# this torch. With DS_BUILD_*=1 the install fails if an op does not compile; ds_report lists them in the build log.
# hadolint ignore=DL3013
RUN DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 DS_BUILD_AIO=1 pip install deepspeed \
    && pip install flash-attn --no-build-isolation \
    && ds_report

COPY pyproject.toml README.md ./
COPY nopetrain ./nopetrain
COPY kernels ./kernels
COPY data_pipelines ./data_pipelines
COPY launch ./launch
RUN pip install -e '.[gpu]'
COPY train.py ./
COPY configs ./configs

# Any user can run the image (enroot/pyxis start it as the submitting user): the code is world-readable and runs
# and logs go to a writable directory that is usually mounted from the shared file system.
RUN mkdir -p /workspace/runs /workspace/logs && chmod 1777 /workspace/runs /workspace/logs

CMD ["python", "train.py", "--help"]
