"""Preemption with real processes: a training process (or torchrun's agent) gets SLURM's signal, checkpoints at the
end of the step, exits with the requeue code, and the next start continues the same run exactly. SLURM, `timeout` and
torchrun signal whole process groups, so the shard tests send the signal to the group, DataLoader workers included."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from nopetrain.checkpoint import complete_checkpoints
from nopetrain.exits import PREEMPTED

from .helpers import (
    REPO,
    WANDB,
    corpus_overrides,
    losses,
    run_train,
    subprocess_env,
    train_command,
    wandb_runs,
)

pytestmark = pytest.mark.slow

BATCH = ("global_batch_size=8", "micro_batch_size=4", "seq_len=64")
STEPS = "steps=12"
# Periodic checkpoints out of the way: the only checkpoint before the end is the preemption's.
NO_PERIODIC = "checkpoint.every=1000"


def logged_steps(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(losses(run_dir)) if metrics.exists() else 0


def signal_after_steps(
    cmd: list[str], run_dir: Path, sig: signal.Signals, after: int, repeat: bool, to: str = "process"
) -> subprocess.CompletedProcess:
    """Starts `cmd` in a session of its own, sends `sig` once `after` steps are logged (twice if `repeat`) to it
    (`to="process"`), its process group ("group", as `timeout` and `kill -TERM -PGID` do) or every process it
    started, whatever their session ("tree", as SLURM's process tracking does: W&B's service process included),
    and waits for it to exit."""
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )

    def send() -> None:
        if to == "group":
            os.killpg(proc.pid, sig)
        elif to == "tree":
            for process in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.send_signal(sig)
        else:
            proc.send_signal(sig)

    deadline = time.monotonic() + 600
    try:
        while proc.poll() is None and logged_steps(run_dir) < after and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "training ended before the signal"
        send()
        if repeat:
            # A second signal while the checkpoint is being written must not abort it.
            time.sleep(0.05)
            send()
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
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
    cmd = train_command(run_dir, STEPS, NO_PERIODIC, WANDB, *BATCH)
    proc = signal_after_steps(cmd, run_dir, sig, after=3, repeat=True)
    assert proc.returncode == PREEMPTED, proc.stderr[-3000:]
    saved = complete_checkpoints(run_dir / "checkpoints")
    assert len(saved) == 1
    step = int(saved[0].name.split("_")[1])
    assert 3 <= step < 12
    state = json.loads((saved[0] / "trainer_state.json").read_text())
    assert state["step"] == step
    assert f"preempted by {sig.name}: checkpoint of step {step} saved to {saved[0]}" in proc.stderr
    assert max(losses(run_dir)) == step

    resumed = run_train(run_dir, STEPS, NO_PERIODIC, WANDB, *BATCH)
    assert f"resumed from {saved[0]} at step {step}" in resumed.stderr
    combined = losses(run_dir)
    assert combined == straight_run
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
    # Two ranks against one process: the gradient all-reduce sums in another order.
    resumed = losses(run_dir)
    for step, loss in straight_run.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), f"step {step}"


def shard_overrides(corpus: Path) -> list[str]:
    # The default data config: one DataLoader worker per source; W&B's service is one more process the signal meets.
    return [STEPS, NO_PERIODIC, WANDB, *corpus_overrides(corpus), *BATCH]


@pytest.fixture(scope="module")
def straight_shard_runs(tmp_path_factory, corpus):
    """Losses of uninterrupted runs on the shards by number of processes (the data split depends on it)."""
    runs = {}
    for nproc in (1, 2):
        run_dir = tmp_path_factory.mktemp(f"straight_shards_{nproc}") / "run"
        run_train(run_dir, *shard_overrides(corpus), nproc=nproc)
        runs[nproc] = losses(run_dir)
    return runs


@pytest.mark.parametrize(
    ("sig", "to"),
    [(signal.SIGTERM, "group"), (signal.SIGUSR1, "group"), (signal.SIGTERM, "tree")],
    ids=["SIGTERM-group", "SIGUSR1-group", "SIGTERM-tree"],
)
def test_signal_to_every_process_spares_loader_workers_and_wandb(tmp_path, corpus, straight_shard_runs, sig, to):
    # What `timeout` (the group) and SLURM (preemption, scancel, time limit: the whole tree) do: the signal reaches
    # the DataLoader workers too, and under SLURM W&B's service process, which runs in a session of its own. SIGTERM
    # killed the workers before they ignored it; SIGUSR1 did not (they inherited the watch's handler), and stays here
    # so that the workers keep ignoring every preemption signal. W&B's service exits on SIGTERM; the run goes on
    # without it.
    run_dir = tmp_path / "run"
    cmd = train_command(run_dir, *shard_overrides(corpus))
    proc = signal_after_steps(cmd, run_dir, sig, after=3, repeat=False, to=to)
    assert proc.returncode == PREEMPTED, proc.stderr[-3000:]
    [saved] = complete_checkpoints(run_dir / "checkpoints")
    assert f"preempted by {sig.name}: checkpoint of step" in proc.stderr

    resumed = run_train(run_dir, *shard_overrides(corpus))
    assert f"resumed from {saved}" in resumed.stderr
    combined = losses(run_dir)
    assert combined == straight_shard_runs[1]
    # Both starts wrote to the same W&B run. Signalled with the tree, W&B's service exits before it has written the
    # first start's offline records (metrics.jsonl has them); the next start continues the run.
    run_id = json.loads((saved / "trainer_state.json").read_text())["wandb_run_id"]
    runs = [run.run_id for run in wandb_runs(run_dir)]
    assert runs == [run_id] * 2 if to == "group" else set(runs) == {run_id}, runs


def test_sigterm_to_torchrun_process_group_with_loader_workers(tmp_path, corpus, straight_shard_runs):
    # The agent forwards SIGTERM to each rank's process group (each rank has a session of its own), workers included.
    run_dir = tmp_path / "run"
    cmd = train_command(run_dir, *shard_overrides(corpus), nproc=2)
    proc = signal_after_steps(cmd, run_dir, signal.SIGTERM, after=3, repeat=False, to="tree")
    assert proc.returncode == 1 and "SignalException" in proc.stderr, proc.stderr[-3000:]
    assert len(complete_checkpoints(run_dir / "checkpoints")) == 1
    assert "preempted by SIGTERM" in proc.stderr, proc.stderr[-3000:]

    run_train(run_dir, *shard_overrides(corpus), nproc=2)
    resumed = losses(run_dir)
    for step, loss in straight_shard_runs[2].items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), f"step {step}"
