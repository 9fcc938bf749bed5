"""benchmarks/gpu_check.sh, the one prepared device call, in its --cpu-smoke mode: the same install, test and
benchmark steps as far as a CPU allows, so that a lent GPU's first call does not fail on the plumbing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .helpers import REPO, subprocess_env


def device_like_python(folder: Path) -> Path:
    """An interpreter like the device image's: .venv-device's packages (the image's versions and the carried wheels,
    Makefile), but nopetrain not installed (that venv's editable install is a .pth file, which a path line does not
    run). Its own venv, so that the script's install lands there and not in .venv-device."""
    device_venv = os.environ.get("NOPETRAIN_DEVICE_VENV")
    if not device_venv:
        pytest.skip("needs the GPU image's versions in .venv-device: run through `make test`")
    [device_packages] = Path(device_venv).glob("lib/python*/site-packages")
    python = Path(device_venv) / "bin" / "python"
    subprocess.run([python, "-m", "venv", "--without-pip", str(folder)], check=True)
    [own] = folder.glob("lib/python*/site-packages")
    (own / "device_image.pth").write_text(f"{device_packages}\n")
    return folder / "bin" / "python"


def test_cpu_smoke_runs_every_step_and_writes_a_summary(tmp_path):
    python = device_like_python(tmp_path / "device-env")
    # Run from the repository root, as the script's steps are, the checkout's nopetrain/ is imported without the
    # folders that install under its namespace: the script's own install must provide them.
    bare = subprocess.run([python, "-c", "import nopetrain.kernels"], cwd=REPO, capture_output=True, text=True)
    assert "No module named 'nopetrain.kernels'" in bare.stderr, bare.stderr
    env = dict(subprocess_env(), OUT=str(tmp_path), PYTHON=str(python), TMPDIR=str(tmp_path))
    # Another torch and Python: DeepSpeed's compiled ops go to their own cache, not over this environment's.
    env["TORCH_EXTENSIONS_DIR"] += "-device"
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--cpu-smoke"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [summary_file] = tmp_path.glob("*/summary.md")
    results, summary = summary_file.parent, summary_file.read_text()
    for name in ("versions", "gpu_tests", "qk_norm_rope_bench_start", "train_step_bench_start", "drope_gpu"):
        assert f"| {name} | ok |" in summary, summary
    for name in ("qk_norm_rope_bench", "train_step_bench"):
        assert f"| {name} | skipped: no GPU (--cpu-smoke)" in summary, summary
    # Each step says its time bound as it starts; the versions step names torch, Triton and flash-attn.
    assert "== gpu_tests (at most 300 s)" in proc.stdout
    # ... and they are the image's (requirements-device.txt), not this environment's.
    pins = dict(re.findall(r"^(torch|triton)==(\S+)", (REPO / "requirements-device.txt").read_text(), re.M))
    versions = (results / "versions.log").read_text()
    assert re.match(
        rf"python 3\.\d+\.\d+, torch {re.escape(pins['torch'])}\S* \(CUDA .*\), triton {re.escape(pins['triton'])}",
        versions,
    ), versions
    assert "skipped" in (results / "gpu_tests.log").read_text()
    # The GPU profile at a tiny size: three arms trained, evaluated, the report and the arms' logs brought back.
    report = (results / "results.md").read_text()
    assert "rope standard NIAH at 1x" in report and "| drope | logit_scale |" in report, report[:2000]
    assert sorted(path.name for path in (results / "logs").iterdir()) == ["drope.log", "nope.log", "rope.log"]
    assert not list(tmp_path.glob("nopetrain-scratch.*")), "the scratch folder is left behind"
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    if shellcheck:
        check = subprocess.run([shellcheck, "-S", "warning", "benchmarks/gpu_check.sh"], cwd=REPO, capture_output=True)
        assert check.returncode == 0, check.stdout.decode()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would run the whole check")
def test_gpu_mode_without_a_gpu_says_so(tmp_path):
    env = dict(subprocess_env(), OUT=str(tmp_path), PYTHON=sys.executable, TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "no CUDA device here; run with --cpu-smoke" in proc.stderr, proc.stderr


def test_a_step_over_its_time_bound_fails_with_that_reason(tmp_path):
    """The bound is real: a step that outlives it is killed and its row says so (here a 1-second bound on a sleep),
    and the check exits 1."""
    script = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    start, end = script.index("step() {"), script.index("\n}\n", script.index("step() {")) + 3
    harness = tmp_path / "harness.sh"
    harness.write_text(
        f"set -euo pipefail\nresults={tmp_path}\nfailed=0\n{script[start:end]}\nstep slow 1 sleep 30\nexit $failed\n"
    )
    proc = subprocess.run(["bash", str(harness)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "| slow | failed (over its 1 s bound) |" in (tmp_path / "summary.md").read_text()
