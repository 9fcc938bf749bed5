"""How a run ends, as a job script reads it: each way out has its own exit code, the same on every rank.

    0   finished (or already at its last step)
    1   crashed: an error nopetrain does not know (a traceback follows)
    2   refused: a config, data, checkpoint or run directory that cannot work; fix it, do not retry
    3   stopped: too many optimizer steps in a row had non-finite losses
    75  preempted: checkpointed after a preemption signal; requeue (EX_TEMPFAIL)

An error that ends a run with a known code derives from `ExitError`; train.py prints its one-line message and exits
with its `exit_code`. A rank that fails alone leaves its peers waiting in a collective until its process exits;
`ownership.FailureRecord` tells them which rank it was and with what code. No torch here: config.py (imported by
dry runs, which must not load torch) uses it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

CRASHED = 1
REFUSED = 2
NONFINITE = 3
# EX_TEMPFAIL (sysexits.h): "try again later", the job script's cue to requeue.
PREEMPTED = 75


class ExitError(Exception):
    """An error that ends a run with `exit_code` and a one-line message, without a traceback."""

    exit_code = REFUSED


def exit_code_of(err: BaseException) -> int:
    """The code a run stopped by `err` exits with."""
    return err.exit_code if isinstance(err, ExitError) else CRASHED


def one_line(message: object) -> str:
    """A message (an error's, a library's) on one line."""
    return " ".join(str(message).split())


def error_line(err: BaseException) -> str:
    """A library's error as one line: its type and the start of its message."""
    return f"{type(err).__name__}: {one_line(err)[:300]}"


# Whether the task of a Hydra application (train.py, nopetrain-eval) has begun: see run_refusing_composition_errors.
_task_started = False


def task_started() -> None:
    """Called first by a Hydra application's task: from here on, Hydra's exit 1 is a crash of the task's."""
    global _task_started
    _task_started = True


def run_refusing_composition_errors(hydra_main: Callable[[], object]) -> None:
    """Runs a @hydra.main function. Hydra reports its own errors (an unknown key or group option, a value of the
    wrong type, a bad override) and exits 1 before calling the task; those are refusals of the command line, so the
    process exits REFUSED instead, as the job script and sweep drivers reading the code expect."""
    try:
        hydra_main()
    except SystemExit as stop:
        if stop.code == CRASHED and not _task_started:
            sys.exit(REFUSED)
        raise
