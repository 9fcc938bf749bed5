"""One incarnation of a run at a time: a run directory has one owner, a rank whose torchrun agent died stops, and
the ranks of an incarnation learn which of them stopped it (`FailureRecord`).

Two incarnations writing one run directory corrupt it quietly: both publish checkpoints, and the next `resume=auto`
continues from whichever is newest. That happens when a job is started again while the previous one still runs,
and when torchrun's agent dies without its ranks (torch starts each rank in a session of its own, so killing the
agent's process group leaves them training, and SLURM may already have restarted the job).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

from nopetrain.atomic import write_bytes
from nopetrain.exits import ExitError, exit_code_of, one_line

LOCK_FILE = "run.lock"
# How long a rank may go on after another rank recorded its failure before FailureRecord.watch_peers ends it: the
# normal way out (the collective it waits in fails once the failed rank's connections close) takes seconds.
PEER_FAILURE_GRACE_S = 30.0
# prctl(2): the signal this process gets when the thread that forked it exits.
PR_SET_PDEATHSIG = 1


class RunDirInUse(ExitError, RuntimeError):
    """Another live process owns the run directory."""


class HolderLock:
    """An exclusive POSIX record lock on `path`, whose text names its holder (pid and host).

    A record lock (fcntl) rather than flock: it is not inherited by fork, so DataLoader workers that outlive a
    SIGKILLed holder for a moment do not keep it, and it works on NFS. The kernel drops it when its holder dies,
    however it dies, so a crashed process never blocks the next one. Closing any descriptor of the file in the
    holder drops it too; nothing else in the process opens it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def try_acquire(self) -> str | None:
        """Takes the lock and returns None, or returns the text of the live process that holds it."""
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            return os.pread(self._fd, 4096, 0).decode(errors="replace").strip() or "a process starting up"
        self._write_holder()
        return None

    def acquire(self) -> None:
        """Takes the lock, waiting for its holder to release it or die."""
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        self._write_holder()

    def _write_holder(self) -> None:
        holder = f"pid {os.getpid()} on host {socket.gethostname()}\n".encode()
        # Written over the previous holder's text, then trimmed: a reader never finds the file empty.
        os.pwrite(self._fd, holder, 0)
        os.ftruncate(self._fd, len(holder))

    def release(self) -> None:
        os.close(self._fd)


@contextlib.contextmanager
def own_run_dir(run_dir: Path, rank: int) -> Iterator[str]:
    """Holds `run_dir` for the duration and yields the id of this incarnation, the same on every rank; raises
    RunDirInUse on every rank if another process holds it.

    Only global rank 0 takes the lock: every incarnation has one, so that suffices to exclude another one, while a
    lock per node would have the nodes of one job refuse each other on a shared file system. Rank 0 sends the outcome
    to the other ranks, so that all of a refused incarnation stop with the same line instead of waiting for it in a
    collective."""
    lock, outcome = None, [None, uuid.uuid4().hex]
    if rank == 0:
        lock = HolderLock(run_dir / LOCK_FILE)
        holder = lock.try_acquire()
        if holder is not None:
            lock.release()
            lock = None
            outcome[0] = f"run directory {run_dir} is in use by {holder}; stop that run first or choose another run.dir"
    dist.broadcast_object_list(outcome, src=0)
    refusal, incarnation = outcome
    if refusal is not None:
        raise RunDirInUse(refusal)
    try:
        yield incarnation
    finally:
        if lock is not None:
            lock.release()


def die_with_torchrun_agent() -> None:
    """Under torchrun on Linux, has the kernel SIGKILL this rank when its agent dies; elsewhere does nothing.

    A rank whose agent is gone must not write: the job may have been restarted, and the new incarnation owns the run
    directory. SIGKILL rather than a handled signal stops a rank at once even when it waits in a collective, and a
    checkpoint it had not published yet (.incomplete-step_N) is never resumed from. Only under torchrun: a plain
    `python train.py` may rightly outlive the shell that started it (nohup, setsid)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    die_with_parent(os.getppid())


def die_with_parent(parent: int) -> None:
    """Has the kernel SIGKILL this process when `parent` (the process that forked it) dies; Linux only."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before prctl: this process has been re-parented already
        os.kill(os.getpid(), signal.SIGKILL)


class PeerFailed(ExitError):
    """Another rank stopped the run; this rank, left waiting for it, ends with that rank's exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class FailureRecord:
    """Why each rank of one incarnation of a run stopped, in `run_dir/logs/failure_rank_N.json`.

    A rank that fails writes its record before its process exits; its exit closes its connections, which ends the
    collective its peers wait in with a gloo error (destroying the group does not: the engine holds it), and a peer
    whose own error is such an error (not nopetrain's) reads who failed here, in the run directory every rank sees.
    The process group's store cannot carry it: rank 0 hosts that store, and takes it away when it is the one that
    exits. `incarnation` (from `own_run_dir`) tells this run's records from an earlier one's."""

    def __init__(self, run_dir: Path, incarnation: str, rank: int, world_size: int) -> None:
        self.folder, self.incarnation, self.rank, self.world_size = run_dir / "logs", incarnation, rank, world_size

    def stop_with(self, err: BaseException) -> BaseException:
        """What this rank stops with: `err`, recorded for the others, or, when `err` is not an error of nopetrain's
        own and another rank recorded a failure first, PeerFailed naming that rank."""
        if self.world_size == 1:
            return err
        first = None if isinstance(err, ExitError) else self._first_failure()
        if first is not None:
            return PeerFailed(f"rank {first['rank']} failed: {first['message']}", first["exit_code"])
        record = {
            "incarnation": self.incarnation,
            "rank": self.rank,
            "exit_code": exit_code_of(err),
            "message": one_line(err) or type(err).__name__,
            "time": time.time(),
        }
        write_bytes(self.folder / f"failure_rank_{self.rank}.json", (json.dumps(record) + "\n").encode())
        return err

    def watch_peers(self, grace: float = PEER_FAILURE_GRACE_S) -> threading.Event:
        """Ends this process with the failed rank's exit code and line when another rank has recorded a failure and
        this one is still running `grace` seconds later: a rank left waiting on a dead peer must end within a bounded
        time whatever it waits in (a store read, a collective, the group's teardown; one such wait outlived a 120 s
        test under load with no bound found). Set the returned event to stop watching."""
        stop = threading.Event()
        if self.world_size > 1:
            threading.Thread(target=self._watch, args=(stop, grace), name="peer-failure-watch", daemon=True).start()
        return stop

    def _watch(self, stop: threading.Event, grace: float) -> None:
        first = None
        while first is None:
            if stop.wait(1.0):
                return
            first = self._first_failure()
        if stop.wait(grace):
            return
        failed = PeerFailed(f"rank {first['rank']} failed: {first['message']}", first["exit_code"])
        print(f"nopetrain: error: {failed} (this rank was still running {grace:.0f} s later)", file=sys.stderr)
        sys.stderr.flush()
        os._exit(failed.exit_code)

    def _first_failure(self) -> dict | None:
        records = []
        for path in self.folder.glob("failure_rank_*.json"):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if record.get("incarnation") == self.incarnation and record.get("rank") != self.rank:
                records.append(record)
        return min(records, key=lambda record: record["time"], default=None)
