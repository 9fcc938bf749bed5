"""Chaos: a real run on real shards (DataLoader workers) SIGKILLed at random moments (start-up, mid-step, mid-save),
at least ten times, and restarted with checkpoint.resume=auto until it finishes, ends with the per-step losses and
final weights of a straight run, bit for bit: for one process and for two torchrun ranks (ZeRO-2)."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from nopetrain.checkpoint import complete_checkpoints
from nopetrain.ownership import LOCK_FILE

from .helpers import REPO, corpus_overrides, losses, run_train, subprocess_env, train_command

pytestmark = pytest.mark.slow

KILLS = 10
# A checkpoint every 2 steps: kills land in saves as often as in steps. A start is killed before it begins training
# or before it logs the step after the one it waits for (kill_at_a_random_moment), so it publishes at most 4 new
# steps: 42 steps cannot finish before the tenth kill, however fast the machine starts and trains.
STEPS = 42
TRAIN = (f"steps={STEPS}", "checkpoint.every=2", "checkpoint.keep=2", "global_batch_size=8", "micro_batch_size=4")
# Share of starts killed during start-up (imports, process group, engine, loaders) rather than after a step.
STARTUP_KILLS = 0.3
STARTUP_SECONDS = 6.0


def wait_until_unowned(run_dir: Path, timeout: float = 60) -> None:
    """Until no process of a killed incarnation holds the run directory (a torchrun rank dies with its agent, a
    moment later)."""
    lock = run_dir / LOCK_FILE
    deadline = time.monotonic() + timeout
    while lock.exists():
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN) or time.monotonic() > deadline:
                raise
        finally:
            os.close(fd)
        time.sleep(0.1)


def last_logged_step(run_dir: Path) -> int:
    try:
        return max(losses(run_dir), default=0)
    except (FileNotFoundError, ValueError):  # not written yet, or a line cut by the kill
        return 0


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = complete_checkpoints(run_dir / "checkpoints")[-1]
    return torch.load(last / "mp_rank_00_model_states.pt", weights_only=True)["module"]


def start(run_dir: Path, overrides: tuple[str, ...], nproc: int, log: Path) -> subprocess.Popen:
    # A session of its own: the process group is the agent, its ranks (killed by their parent-death signal, as
    # they have sessions of their own) and every DataLoader worker. Output to a file: an unread pipe could fill up
    # and stall the run.
    with open(log, "w") as handle:
        return subprocess.Popen(
            train_command(run_dir, *overrides, nproc=nproc),
            cwd=REPO,
            env=subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=handle,
            start_new_session=True,
        )


def kill_at_a_random_moment(proc: subprocess.Popen, run_dir: Path, log: Path, rng: random.Random) -> str | None:
    """SIGKILLs the process group during start-up (before its log says training begins) or just after one of the
    next 3 steps (in the next step or in a checkpoint save); returns when, or None if the process ended first. A wait
    drawn in seconds alone would let a machine that starts fast run on for many steps."""
    saved = complete_checkpoints(run_dir / "checkpoints")
    resumed_at = int(saved[-1].name.removeprefix("step_")) if saved else 0
    if rng.random() < STARTUP_KILLS:
        after_step, last_step, wait = None, None, rng.uniform(0.2, STARTUP_SECONDS)
    else:
        after_step = resumed_at + rng.randint(1, 3)
        last_step, wait = after_step + 1, rng.uniform(0, 0.4)
    deadline = time.monotonic() + 600
    while after_step is not None and last_logged_step(run_dir) < after_step and proc.poll() is None:
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.02)
    until = time.monotonic() + wait
    while time.monotonic() < until and proc.poll() is None:
        if last_step is None and "training steps " in log.read_text():
            break
        if last_step is not None and last_logged_step(run_dir) > last_step:
            break
        time.sleep(0.01)
    if proc.poll() is not None:
        return None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return f"{'start-up' if after_step is None else f'step {after_step}'} +{wait:.2f}s"


@pytest.mark.parametrize("nproc", [1, 2], ids=["one-process", "two-ranks"])
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, corpus, nproc):
    overrides = (*corpus_overrides(corpus), *TRAIN, *(["deepspeed=zero2"] if nproc == 2 else []))
    straight = tmp_path / "straight"
    run_train(straight, *overrides, nproc=nproc)

    chaos, rng, moments = tmp_path / "chaos", random.Random(nproc), []
    while len(moments) < KILLS:
        log = tmp_path / f"start_{len(moments)}.log"
        moment = kill_at_a_random_moment(start(chaos, overrides, nproc, log), chaos, log, rng)
        assert moment, f"the run finished after {len(moments)} kills: {log.read_text()[-2000:]}"
        moments.append(moment)
        wait_until_unowned(chaos)
    log = tmp_path / "last_start.log"
    proc = start(chaos, overrides, nproc, log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    print(f"killed at {moments}")
    assert losses(chaos) == losses(straight)
    straight_weights, chaos_weights = final_weights(straight), final_weights(chaos)
    assert straight_weights.keys() == chaos_weights.keys()
    for name, weight in straight_weights.items():
        assert torch.equal(chaos_weights[name], weight), name
