"""A run directory has one owner at a time: a second start on it is refused while the first runs, a SIGKILLed owner
does not block its restart, and the ranks of a torchrun agent that was killed stop instead of writing on."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from nopetrain.checkpoint import complete_checkpoints

from .helpers import REPO, corpus_overrides, losses, run_train, subprocess_env, train_command

pytestmark = pytest.mark.slow

BATCH = ("global_batch_size=8", "micro_batch_size=4", "seq_len=64")


def start_in_session(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )


def wait_for_steps(proc: subprocess.Popen, run_dir: Path, steps: int) -> None:
    deadline = time.monotonic() + 300
    while not ((run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= steps):
        assert proc.poll() is None, f"training ended early:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no training steps logged"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(FileNotFoundError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def test_second_start_is_refused_and_a_killed_owner_does_not_block(tmp_path, corpus):
    run_dir = tmp_path / "run"
    data = [*corpus_overrides(corpus), *BATCH, "checkpoint.every=1000"]
    owner = start_in_session(train_command(run_dir, "steps=1000", *data))
    try:
        wait_for_steps(owner, run_dir, 2)
        second = run_train(run_dir, "steps=4", *data, check=False)
        assert second.returncode == 2, second.stderr[-3000:]
        holder = f"pid {owner.pid} on host {socket.gethostname()}"
        refusal = f"nopetrain: error: run directory {run_dir} is in use by {holder}"
        assert second.stderr.strip().splitlines()[-1].startswith(refusal), second.stderr[-3000:]
        assert owner.poll() is None
        # Only the owner: its DataLoader workers outlive it for a moment, and must not keep the directory locked.
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        run_train(run_dir, "steps=2", *data)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(owner.pid, signal.SIGKILL)


def test_ranks_of_a_killed_torchrun_agent_stop_without_writing(tmp_path):
    # SIGKILL to the agent's process group does not reach its ranks (torch gives each a session of its own).
    run_dir = tmp_path / "run"
    agent = start_in_session(train_command(run_dir, "steps=400", "checkpoint.every=2", *BATCH, nproc=2))
    ranks: list[int] = []
    try:
        wait_for_steps(agent, run_dir, 3)
        ranks = children(agent.pid)
        assert len(ranks) == 2
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in ranks), "ranks still running after their agent died"
        published = complete_checkpoints(run_dir / "checkpoints")
        time.sleep(2)
        assert complete_checkpoints(run_dir / "checkpoints") == published
    finally:
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def descendants(pid: int) -> list[int]:
    found = children(pid)
    return found + [grandchild for child in found for grandchild in descendants(child)]


def test_loader_workers_die_with_their_rank_whatever_kills_it(tmp_path, corpus):
    """SIGKILL leaves no rank to shut its DataLoader workers down: they must not outlive it (they did, with their
    shards in memory, and piled up under requeues onto the same node). At once, not after torch's watchdog's next
    look (every 5 s, and only while a worker waits for work: one blocked flushing a full queue never looks)."""
    run_dir = tmp_path / "run"
    data = [*corpus_overrides(corpus), *BATCH, "data.num_workers=2", "checkpoint.every=1000", "wandb.mode=disabled"]
    rank = start_in_session(train_command(run_dir, "steps=1000", *data))
    left: list[int] = []
    try:
        wait_for_steps(rank, run_dir, 2)
        left = descendants(rank.pid)
        assert len(left) >= 2, left  # a worker per source and rank at least
        os.kill(rank.pid, signal.SIGKILL)
        rank.wait()
        deadline = time.monotonic() + 2
        while any(alive(pid) for pid in left) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in left if alive(pid)], "processes of the run left 2 s after its rank was killed"
    finally:
        for pid in [rank.pid, *left]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
