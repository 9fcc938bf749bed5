"""One incarnation of a run at a time: a run directory has one owner, and a rank whose torchrun agent died stops.

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
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

LOCK_FILE = "run.lock"
# prctl(2): the signal this process gets when the thread that forked it exits.
PR_SET_PDEATHSIG = 1


class RunDirInUse(RuntimeError):
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
def own_run_dir(run_dir: Path, rank: int) -> Iterator[None]:
    """Holds `run_dir` for the duration; raises RunDirInUse on every rank if another process holds it.

    Only global rank 0 takes the lock: every incarnation has one, so that suffices to exclude another one, while a
    lock per node would have the nodes of one job refuse each other on a shared file system. Rank 0 sends the outcome
    to the other ranks, so that all of a refused incarnation stop with the same line instead of waiting for it in a
    collective."""
    lock, refusal = None, [None]
    if rank == 0:
        lock = HolderLock(run_dir / LOCK_FILE)
        holder = lock.try_acquire()
        if holder is not None:
            lock.release()
            lock = None
            refusal = [f"run directory {run_dir} is in use by {holder}; stop that run first or choose another run.dir"]
    dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise RunDirInUse(refusal[0])
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def die_with_torchrun_agent() -> None:
    """Under torchrun on Linux, has the kernel SIGKILL this rank when its agent dies; elsewhere does nothing.

    A rank whose agent is gone must not write: the job may have been restarted, and the new incarnation owns the run
    directory. SIGKILL rather than a handled signal stops a rank at once even when it waits in a collective, and a
    checkpoint it had not published yet (.incomplete-step_N) is never resumed from. Only under torchrun: a plain
    `python train.py` may rightly outlive the shell that started it (nohup, setsid)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    agent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != agent:  # the agent died before prctl: this rank has been re-parented already
        os.kill(os.getpid(), signal.SIGKILL)
