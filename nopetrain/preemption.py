"""Preemption: the scheduler sends a signal some time before it kills the job; the trainer finishes the current
optimizer step, writes a checkpoint and exits with exit code 75, and the job script requeues the job.

The signal handler only records the signal (async-signal-safe). Ranks agree on it without a device sync: each step
starts an async all-reduce (MAX) of a CPU int tensor on a side gloo group and waits for it after the optimizer step,
by which time it has long completed, so the agreement costs no GPU host sync and no wait in the common case.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from nopetrain.exits import PREEMPTED, ExitError

# SLURM's `--signal=USR1@<seconds>` (sbatch) and SIGTERM (scancel, preemption, torchrun's agent); SIGUSR2 is what
# submitit (hydra/launcher=slurm) asks SLURM for.
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
# Written into run.dir by rank 0 with the checkpoint of a preemption: the signal's name. The SLURM job script
# (nopetrain/launch/slurm.py) requeues after SIGUSR1/SIGUSR2 and after SLURM's preemption, not after a user's
# `scancel --signal=TERM`.
PREEMPTED_BY_FILE = "preempted_by"


class Preempted(ExitError):
    """The run checkpointed at `step` after a preemption signal and exits with code 75 (the job script requeues)."""

    exit_code = PREEMPTED

    def __init__(self, step: int, checkpoint: str, signal_name: str) -> None:
        super().__init__(f"preempted by {signal_name}: checkpoint of step {step} saved to {checkpoint}")
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name


def ignore_preemption_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: the worker ignores the preemption signals and SIGINT.

    SLURM, `timeout` and torchrun's agent signal whole process groups, the workers included. torch gives each worker
    a SIGTERM handler that dies of the signal unless the worker's parent sent it, and the training process's SIGCHLD
    handler then raises "DataLoader worker ... is killed by signal" in the middle of the step, before it can save.
    The training process owns its workers: it shuts them down when it closes a stream or exits, and torch's
    watchdog ends a worker whose training process died."""
    for sig in (*PREEMPTION_SIGNALS, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    # Forked with them blocked (preemption_signals_blocked): a signal that came in between is discarded now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, PREEMPTION_SIGNALS)


@contextlib.contextmanager
def preemption_signals_blocked() -> Iterator[None]:
    """Holds the preemption signals back from this thread (one that arrives meanwhile is delivered after) and from the
    processes it forks, which inherit the mask. DataLoader workers are forked so, and unblock them once they ignore
    them (ignore_preemption_signals): in between, torch's own SIGTERM handler let a signal kill a worker that was
    starting when the job was signalled (seen under SLURM: a source's workers start at its first sample)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class PreemptionWatch:
    """Records preemption signals from the moment it is installed; `start_step` / `signalled` agree across ranks.

    Install it first, so that a signal during start-up is not lost. Data loader workers ignore these signals
    (`ignore_preemption_signals`). A handler that was installed before this one (submitit's requeue handler) is
    handed the signal after the checkpoint: see `hand_over`."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {sig: signal.signal(sig, self._record) for sig in PREEMPTION_SIGNALS}
        self._flag = torch.zeros(1, dtype=torch.int32)
        self._group: dist.ProcessGroup | None = None
        self._pending: dist.Work | None = None

    def _record(self, signum: int, frame: FrameType | None) -> None:
        # A second signal (e.g. during the save) changes nothing: the checkpoint in progress completes.
        if self.received is None:
            self.received = signum

    def start_step(self) -> None:
        """Starts this rank's vote for the step; call at its top, on every rank."""
        if self._group is None:
            # Separate from the default group so that it never orders itself among DeepSpeed's collectives.
            self._group = dist.new_group(backend="gloo")
        # The signal's number: the MAX agrees on one signal too (SIGTERM over SIGUSR1/2), whichever rank got it.
        self._flag.fill_(self.received or 0)
        self._pending = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)

    def signalled(self) -> bool:
        """Whether any rank had received a preemption signal when the step started; call after its optimizer step."""
        self._pending.wait()
        self._pending = None
        return bool(self._flag.item())

    def signal_name(self) -> str:
        """The agreed signal's name, once `signalled` has said there is one."""
        return signal.Signals(int(self._flag.item())).name

    def hand_over(self) -> None:
        """Calls the handler that was in place before ours for the received signal, if it was a Python function
        (submitit's requeues the job and exits); SIG_DFL / SIG_IGN are left alone, the caller exits."""
        previous = self.previous.get(self.received) if self.received is not None else None
        if callable(previous):
            previous(self.received, None)

    def uninstall(self, stopping: bool = False) -> None:
        """Restores the previous handlers or, `stopping` (preempted, or failed), ignores the preemption signals until
        the process exits: a later signal must not turn exit 75 or 2 into death by signal (srun ends a step's other
        tasks with SIGTERM once one exits non-zero, and torchrun's agent its other ranks)."""
        if self._pending is not None:
            # Left by a way out through an error: the vote no longer counts, and a peer that failed broke it.
            with contextlib.suppress(RuntimeError):
                self._pending.wait()
            self._pending = None
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_IGN if stopping else handler)
