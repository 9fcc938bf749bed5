"""Every way out of a run ends with its own exit code, every time (nopetrain/exits.py): each refusal repeated in one
process (tests/exit_paths.py), whose every repetition must also leave no process group behind, and whose end must
not abort; ranks that disagree end together, the waiting one naming the rank that failed."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nopetrain.config import ConfigError
from nopetrain.ownership import LOCK_FILE, FailureRecord, HolderLock
from nopetrain.parallel import free_port

from .helpers import REPO, corpus_overrides, damage_one_of_two_web_shards, run_train, subprocess_env, train_command

REPEAT = 20
BATCH = ("global_batch_size=8", "micro_batch_size=4", "seq_len=64")
ERROR = "nopetrain: error: "


def run_repeated(run_dir: Path, *overrides: str, times: int = REPEAT) -> tuple[list, list[str]]:
    """tests/exit_paths.py: train.py's run() on train_command's config, `times` times in one process; (exit codes,
    its stderr lines)."""
    cmd = [sys.executable, str(REPO / "tests" / "exit_paths.py"), str(times), *train_command(run_dir, *overrides)[2:]]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    return check_clean_end(proc)


def check_clean_end(proc: subprocess.CompletedProcess) -> tuple[list, list[str]]:
    """The repetitions' codes and the stderr lines of a driver process that must have ended by itself, cleanly."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1]), proc.stderr.splitlines()


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    run_train(run_dir, "steps=2", "checkpoint.every=2", *BATCH)
    return run_dir


def refusal(name: str, tmp_path: Path, corpus: Path, checkpointed_run: Path) -> tuple[list[str], str]:
    """The overrides of refusal `name` and the start of the one line it must print."""
    run_dir = tmp_path / "run"
    common = ["steps=4", *BATCH]
    if name == "resume path":
        return [*common, f"checkpoint.resume={tmp_path / 'none'}"], f"checkpoint.resume={tmp_path / 'none'}: not a"
    if name == "damaged checkpoint":
        shutil.copytree(checkpointed_run, run_dir)
        states = run_dir / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
        states.write_bytes(states.read_bytes()[:100])
        return [*common, f"checkpoint.resume={states.parent}"], f"checkpoint.resume={states.parent}: {states.name} has"
    if name == "phase on this world size":
        phase = "curriculum.phases.1.global_batch_size=6"
        return [
            *common,
            *corpus_overrides(corpus),
            "curriculum=demo",
            phase,
        ], "curriculum.phases[1].global_batch_size=6"
    if name == "eval source":
        return [*common, "eval.every=1", "eval.source=web"], "eval.source=web: no manifest.json there"
    raise ValueError(name)


@pytest.mark.parametrize("name", ["resume path", "damaged checkpoint", "phase on this world size", "eval source"])
def test_a_refused_start_exits_2_with_one_line_every_time(name, tmp_path, corpus, checkpointed_run):
    overrides, line = refusal(name, tmp_path, corpus, checkpointed_run)
    codes, stderr = run_repeated(tmp_path / "run", *overrides)
    assert codes == [2] * REPEAT
    assert len(stderr) == REPEAT and all(row.startswith(ERROR + line) for row in stderr), stderr[:3]


def test_a_run_dir_in_use_is_refused_in_one_line_every_time(tmp_path):
    run_dir = tmp_path / "run"
    owner = HolderLock(run_dir / LOCK_FILE)  # held by this process, alive: the owner of the run directory
    assert owner.try_acquire() is None
    try:
        codes, stderr = run_repeated(run_dir, "steps=4", *BATCH)
        assert codes == [2] * REPEAT
        assert len(stderr) == REPEAT and all(
            row.startswith(f"{ERROR}run directory {run_dir} is in use") for row in stderr
        )
        # And as a job script sees it: a process each time, its exit code, one line on stderr, nothing on stdout.
        for _ in range(10):
            proc = run_train(run_dir, "steps=4", *BATCH, check=False)
            assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-3000:]
            assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(ERROR), proc.stderr
    finally:
        owner.release()


def test_finished_runs_exit_0_and_a_non_finite_stop_exits_3_every_time(tmp_path):
    codes, _ = run_repeated(tmp_path / "done", "steps=1", *BATCH)
    # The first repetition trains its step; the others find the run at its last step.
    assert codes == [0] * REPEAT
    # lr 1e30 sends the weights to infinity in the first update; each repetition resumes there and stops again.
    nonfinite = ["steps=20", "optim.lr=1e30", "max_consecutive_nonfinite=2", *BATCH]
    codes, stderr = run_repeated(tmp_path / "nan", *nonfinite, times=5)
    assert codes == [3] * 5
    assert len([row for row in stderr if row.startswith(f"{ERROR}2 optimizer steps in a row")]) == 5


def start_rank(run_dir: Path, rank: int, port: int, *overrides: str) -> subprocess.Popen:
    """Rank `rank` of 2 as its own `python train.py`, as SLURM starts one task per GPU."""
    env = dict(subprocess_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    env["MASTER_PORT"] = str(port)
    return subprocess.Popen(
        train_command(run_dir, *overrides), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.parametrize("shard", [0, 1])
def test_ranks_that_disagree_end_together_and_the_waiting_one_names_the_failed_rank(tmp_path, corpus, shard):
    # Each rank reads one of the two shards; the one that reads the bad shard fails alone, the other waits for it
    # in the step's gradient all-reduce. Rank 0 hosts the process group's store, so both roles are tried.
    data = damage_one_of_two_web_shards(corpus, tmp_path, shard)
    overrides = [*corpus_overrides(data), "data.sources.code.weight=0", "data.sources.math.weight=0", "steps=4"]
    overrides += ["global_batch_size=8", "micro_batch_size=4"]
    failed_lines = set()
    for _ in range(REPEAT // 2):
        port = free_port()
        ranks = [start_rank(tmp_path / "run", rank, port, *overrides) for rank in (0, 1)]
        ended = [(rank.communicate(timeout=120), rank.returncode) for rank in ranks]
        errors = []
        for (_, stderr), code in ended:
            assert code == 2, stderr[-3000:]
            assert "terminate called" not in stderr and "Traceback" not in stderr, stderr[-3000:]
            errors.append([row for row in stderr.splitlines() if row.startswith(ERROR)])
        [own], [other] = errors if "rank " not in errors[0][0] else errors[::-1]
        failed = 0 if own in errors[0] else 1
        assert "data.sources.web: shard " in own and ".tar: " in own, own
        assert other == f"{ERROR}rank {failed} failed: {own.removeprefix(ERROR)}"
        failed_lines.add(own)
    assert len(failed_lines) == 1  # the same shard, hence the same rank, every time


def test_a_rendezvous_port_that_is_taken_is_refused_in_one_line(tmp_path):
    """Rank 0 of a task-per-rank start binds MASTER_PORT: another process holding it was a C++ stack trace."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        rank = start_rank(tmp_path / "run", 0, port, "steps=2", "data=synthetic", "wandb.mode=disabled")
        _, stderr = rank.communicate(timeout=120)
    assert rank.returncode == 2, stderr[-3000:]
    assert [line for line in stderr.splitlines() if line.startswith(ERROR)] == [
        f"{ERROR}MASTER_PORT={port}: the rendezvous port 127.0.0.1:{port} is taken by another process; set "
        "MASTER_PORT to a free port"
    ], stderr[-3000:]


def test_a_rank_still_running_after_its_peer_failed_ends_within_the_grace(tmp_path):
    """Whatever a rank waits in when its peer dies, it ends: here it waits in a sleep no collective error reaches,
    as the rank that outlived a 120 s timeout under load did."""
    stuck = (
        "import time\nfrom pathlib import Path\nfrom nopetrain.ownership import FailureRecord\n"
        f"FailureRecord(Path({str(tmp_path)!r}), 'incarnation', 0, 2).watch_peers(grace=1.0)\ntime.sleep(120)\n"
    )
    rank = subprocess.Popen([sys.executable, "-c", stuck], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
        (tmp_path / "logs").mkdir()  # made by the run's logging set-up
        peer = FailureRecord(tmp_path, "incarnation", 1, 2)
        peer.stop_with(ConfigError("data.sources.web: shard web-000001.tar: truncated"))
        _, stderr = rank.communicate(timeout=30)
    finally:
        rank.kill()
    assert rank.returncode == 2, stderr
    assert stderr.strip() == (
        f"{ERROR}rank 1 failed: data.sources.web: shard web-000001.tar: truncated (this rank was still running 1 s "
        "later)"
    )
