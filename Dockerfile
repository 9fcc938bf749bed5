# CUDA image for cluster runs: PyTorch (same pin as the Makefile), DeepSpeed with its CUDA ops compiled at build
# time (no JIT compile on every node at start-up), flash-attn, and nopetrain installed.
#   docker build -t nopetrain .
#   docker run --gpus all --ipc=host -v $PWD/runs:/workspace/runs nopetrain \
#       torchrun --standalone --nproc_per_node=8 train.py model=smollm_360m precision=bf16
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    TORCH_CUDA_ARCH_LIST="8.0;9.0" \
    MAX_JOBS=8

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev python3-venv git ninja-build libaio-dev \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv "$VIRTUAL_ENV" && pip install --upgrade pip && pip install torch==2.13.0

# DeepSpeed's fused Adam, CPU Adam (ZeRO-Offload) and async I/O built ahead of time.
RUN DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 DS_BUILD_AIO=1 pip install deepspeed \
    && pip install flash-attn --no-build-isolation

WORKDIR /workspace
COPY pyproject.toml README.md ./
COPY nopetrain ./nopetrain
COPY kernels ./kernels
COPY data_pipelines ./data_pipelines
RUN pip install -e '.[gpu]'
COPY train.py ./
COPY configs ./configs
COPY launch ./launch

CMD ["python", "train.py", "--help"]
