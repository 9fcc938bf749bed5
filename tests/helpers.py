"""Shared test set-up: real training runs in subprocesses (python train.py / torchrun) and their metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "nopetrain" / "torch_extensions"))
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    return env


def run_train(
    run_dir: Path, *overrides: str, nproc: int = 1, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Runs train.py on the tiny model in fp32 with `overrides`, in one process or under torchrun."""
    args = [f"run.dir={run_dir}", "precision=fp32", "log_every=1", "wandb.mode=offline", *overrides]
    if nproc == 1:
        cmd = [sys.executable, str(REPO / "train.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd += [str(REPO / "train.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    """Loss per step from run_dir/metrics.jsonl; a step logged twice (after a resume) keeps its last value."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
