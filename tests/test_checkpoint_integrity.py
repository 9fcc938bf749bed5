"""Checkpoints as untrusted data: a crafted pickle in any checkpoint file is refused by every reader (resume, export,
evaluation) before its code runs, and a damaged checkpoint is skipped by `resume=auto` and refused when named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nopetrain.checkpoint import find_damage, write_checksums

from .helpers import REPO, copy_run, losses, run_train, subprocess_env

pytestmark = pytest.mark.slow

BATCH = ("global_batch_size=8", "micro_batch_size=4", "seq_len=64")
STEPS = ("steps=5", "checkpoint.every=1", "checkpoint.keep=5")
MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
RANK_STATE = "rank_00000.pt"


def tag(step: int) -> str:
    return f"step_{step:08d}"


class CreatesMarker:
    """Unpickling this runs code of the file's choosing: it creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    """Five steps, a checkpoint after each."""
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    run_train(run_dir, *STEPS, *BATCH)
    return run_dir


def craft(file: Path, marker: Path) -> None:
    """Replaces `file` with a torch.save pickle that creates `marker` when loaded unsafely, and re-records the
    checksums as whoever placed it could, so that only the loader stands between the file and its code."""
    torch.save({"module": CreatesMarker(marker), "optimizer_state_dict": CreatesMarker(marker)}, file)
    write_checksums(file.parent)


def error_lines(stderr: str, prefix: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(prefix)]


@pytest.mark.parametrize("name", [MODEL_STATES, OPTIM_STATES, RANK_STATE])
def test_resume_refuses_a_pickle_that_runs_code(saved_run, tmp_path, name):
    run_dir = copy_run(saved_run, tmp_path)
    crafted, marker = run_dir / "checkpoints" / tag(5) / name, tmp_path / "marker"
    craft(crafted, marker)
    proc = run_train(run_dir, "steps=6", *BATCH, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert not marker.exists()
    [error] = error_lines(proc.stderr, "nopetrain: error:")
    assert error.startswith(f"nopetrain: error: {crafted}: refused to load"), error


@pytest.mark.parametrize("name", [MODEL_STATES, OPTIM_STATES])
def test_export_refuses_a_pickle_that_runs_code(saved_run, tmp_path, name):
    run_dir = copy_run(saved_run, tmp_path)
    crafted, marker = run_dir / "checkpoints" / tag(5) / name, tmp_path / "marker"
    craft(crafted, marker)
    output = tmp_path / "hf"
    cmd = [sys.executable, "-m", "nopetrain.export", "--checkpoint", str(crafted.parent), "--output", str(output)]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert not marker.exists()
    [error] = error_lines(proc.stderr, "nopetrain-export: error:")
    assert error.startswith(f"nopetrain-export: error: {crafted}: refused to load"), error
    assert not output.exists()


def test_evaluation_refuses_a_pickle_that_runs_code(saved_run, tmp_path):
    run_dir = copy_run(saved_run, tmp_path)
    crafted, marker = run_dir / "checkpoints" / tag(5) / MODEL_STATES, tmp_path / "marker"
    craft(crafted, marker)
    cmd = [sys.executable, "-m", "nopetrain.eval", f"checkpoint={run_dir}", f"out={tmp_path / 'out'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert not marker.exists()
    [error] = error_lines(proc.stderr, "nopetrain-eval: error:")
    assert error.startswith(f"nopetrain-eval: error: {crafted}: refused to load"), error


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def damage_checkpoints(root: Path) -> dict[str, str]:
    """Damages steps 2-5 each in another way; returns the reason resume must give per tag."""
    truncate(root / tag(5) / MODEL_STATES)
    truncate(root / tag(4) / OPTIM_STATES)
    truncate(root / tag(3) / RANK_STATE)
    # Garbage with re-recorded checksums: they match, the trainer state still does not parse.
    (root / tag(2) / "trainer_state.json").write_text("{not json")
    write_checksums(root / tag(2))
    return {
        tag(5): f"{MODEL_STATES} has",
        tag(4): f"{OPTIM_STATES} has",
        tag(3): f"{RANK_STATE} has",
        tag(2): "trainer_state.json is not valid JSON",
    }


def test_resume_auto_falls_back_to_the_newest_intact_checkpoint(saved_run, tmp_path):
    run_dir = copy_run(saved_run, tmp_path)
    root = run_dir / "checkpoints"
    reasons = damage_checkpoints(root)
    damaged = {name: {f.name: f.read_bytes() for f in (root / name).iterdir()} for name in [tag(2), tag(3), tag(4)]}
    # Saving only at the end: the damaged checkpoints of steps 2-4 must still be there afterwards.
    proc = run_train(run_dir, "steps=5", "checkpoint.every=100", "checkpoint.keep=5", *BATCH)
    warnings = [line for line in proc.stderr.splitlines() if "checkpoint.resume=auto: skipping" in line]
    assert len(warnings) == 4, proc.stderr[-3000:]
    for line, (name, reason) in zip(warnings, reasons.items(), strict=True):
        assert f"skipping {root / name} ({reason}" in line, line
    assert f"resumed from {root / tag(1)} at step 1" in proc.stderr
    for name, files in damaged.items():
        assert {f.name: f.read_bytes() for f in (root / name).iterdir()} == files
    assert find_damage(root / tag(5)) is None
    assert losses(run_dir) == pytest.approx(losses(saved_run), rel=1e-5)


def test_resume_refuses_a_named_damaged_checkpoint(saved_run, tmp_path):
    run_dir = copy_run(saved_run, tmp_path)
    checkpoint = run_dir / "checkpoints" / tag(5)
    truncate(checkpoint / MODEL_STATES)
    proc = run_train(run_dir, "steps=6", f"checkpoint.resume={checkpoint}", *BATCH, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    [error] = error_lines(proc.stderr, "nopetrain: error:")
    size = (saved_run / "checkpoints" / tag(5) / MODEL_STATES).stat().st_size
    assert error == (
        f"nopetrain: error: checkpoint.resume={checkpoint}: {MODEL_STATES} has {size // 2} bytes, "
        f"checksums.json records {size}"
    )


def test_resume_auto_without_an_intact_checkpoint_stops_in_one_line(saved_run, tmp_path):
    run_dir = copy_run(saved_run, tmp_path)
    root = run_dir / "checkpoints"
    damage_checkpoints(root)
    (root / tag(1) / "checksums.json").unlink()
    proc = run_train(run_dir, "steps=6", *BATCH, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    [error] = error_lines(proc.stderr, "nopetrain: error:")
    assert error.startswith(f"nopetrain: error: checkpoint.resume=auto: none of the checkpoints in {root} is intact")
    assert f"skipping {root / tag(1)} (no checksums.json" in proc.stderr
    assert json.loads((root / tag(1) / "trainer_state.json").read_text())["step"] == 1
