"""Preemption with real processes: a training process (or torchrun's agent) gets SLURM's signal, checkpoints at the
end of the step, exits with the requeue code, and the next start continues the same run exactly."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from nopetrain.checkpoint import complete_checkpoints
from nopetrain.preemption import PREEMPTED_EXIT_CODE

from .helpers import REPO, losses, run_train, subprocess_env, train_command, wandb_runs

pytestmark = pytest.mark.slow

BATCH = ("global_batch_size=8", "micro_batch_size=4", "seq_len=64")
STEPS = "steps=12"
# Periodic checkpoints out of the way: the only checkpoint before the end is the preemption's.
NO_PERIODIC = "checkpoint.every=1000"


def logged_steps(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(losses(run_dir)) if metrics.exists() else 0


def signal_after_steps(
    cmd: list[str], run_dir: Path, sig: signal.Signals, after: int, repeat: bool
) -> subprocess.CompletedProcess:
    """Starts `cmd`, sends `sig` once `after` steps are logged (twice if `repeat`), and waits for it to exit."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 600
    try:
        while proc.poll() is None and logged_steps(run_dir) < after and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "training ended before the signal"
        proc.send_signal(sig)
        if repeat:
            # A second signal while the checkpoint is being written must not abort it.
            time.sleep(0.05)
            proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    run_train(run_dir, STEPS, *BATCH)
    return losses(run_dir)


def test_signal_checkpoints_exits_75_and_resumes_exactly(tmp_path, straight_run):
    # One task per GPU under SLURM: the signal reaches train.py itself (SIGTERM here, SIGUSR1 below).
    run_dir = tmp_path / "run"
    sig = signal.SIGTERM
    cmd = train_command(run_dir, STEPS, NO_PERIODIC, *BATCH)
    proc = signal_after_steps(cmd, run_dir, sig, after=3, repeat=True)
    assert proc.returncode == PREEMPTED_EXIT_CODE, proc.stderr[-3000:]
    saved = complete_checkpoints(run_dir / "checkpoints")
    assert len(saved) == 1
    step = int(saved[0].name.split("_")[1])
    assert 3 <= step < 12
    state = json.loads((saved[0] / "trainer_state.json").read_text())
    assert state["step"] == step
    assert f"preempted by {sig.name}: checkpoint of step {step} saved to {saved[0]}" in proc.stderr
    assert max(losses(run_dir)) == step

    resumed = run_train(run_dir, STEPS, NO_PERIODIC, *BATCH)
    assert f"resumed from {saved[0]} at step {step}" in resumed.stderr
    combined = losses(run_dir)
    assert sorted(combined) == sorted(straight_run)
    # To fp32 rounding: a planned stop_at_step + resume shows the same last-bit differences on some steps.
    for step, loss in straight_run.items():
        assert combined[step] == pytest.approx(loss, rel=1e-6, abs=0), f"step {step}"
    # The requeued process continues the same W&B run: two offline segments, one run id.
    assert [run.run_id for run in wandb_runs(run_dir)] == [state["wandb_run_id"]] * 2


def test_signal_to_torchrun_agent(tmp_path, straight_run):
    # SLURM signals torchrun's agent; it forwards the signals named by --signals-to-handle (as launch/torchrun.sh
    # sets them) to its workers, which agree at the end of the step, checkpoint and exit 75; the agent waits for
    # them, then re-raises the signal as an exception and exits 1. A second signal would abort that wait.
    run_dir = tmp_path / "run"
    cmd = train_command(run_dir, STEPS, NO_PERIODIC, *BATCH, nproc=2)
    cmd.insert(cmd.index("--standalone"), "--signals-to-handle=SIGTERM,SIGINT,SIGUSR1")
    proc = signal_after_steps(cmd, run_dir, signal.SIGUSR1, after=3, repeat=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "SignalException" in proc.stderr
    saved = complete_checkpoints(run_dir / "checkpoints")
    assert len(saved) == 1 and "preempted by SIGUSR1" in proc.stderr, proc.stderr[-3000:]

    run_train(run_dir, STEPS, NO_PERIODIC, *BATCH, nproc=2)
    resumed = losses(run_dir)
    for step, loss in straight_run.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), f"step {step}"
