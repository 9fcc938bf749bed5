"""Resuming keeps the run's history straight: a rewind to an older checkpoint is refused unless asked for and then
sets the later steps aside, pruning never takes the checkpoint a run resumed from, a resume adds no event rows, and a
changed config is refused when it would rewrite the steps already taken and reported otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nopetrain.checkpoint import complete_checkpoints

from .helpers import copy_run, losses, run_train

pytestmark = pytest.mark.slow

BATCH = ("global_batch_size=8", "micro_batch_size=4", "seq_len=64")
# Checkpoints every 2 steps, the newest 2 kept: a run to step 8 holds step_00000006 and step_00000008.
SAVES = ("steps=8", "checkpoint.every=2", "checkpoint.keep=2", "wandb.mode=disabled")


def tag(step: int) -> str:
    return f"step_{step:08d}"


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_names(run_dir: Path) -> list[str]:
    return [path.name for path in complete_checkpoints(run_dir / "checkpoints")]


def error_line(stderr: str) -> str:
    [line] = [line for line in stderr.splitlines() if line.startswith("nopetrain: error:")]
    return line


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    """Eight steps as 4 + a plain resume + 4."""
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    run_train(run_dir, *SAVES, "stop_at_step=4", *BATCH)
    run_train(run_dir, *SAVES, *BATCH)
    return run_dir


def test_plain_resume_adds_no_event_and_no_duplicate_rows(saved_run):
    assert [row["step"] for row in rows(saved_run)] == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert [(row["step"], row["event"]) for row in rows(saved_run) if "event" in row] == [(0, "phase")]


def test_resume_from_an_older_checkpoint_is_refused_without_rewind(saved_run, tmp_path):
    run_dir = copy_run(saved_run, tmp_path)
    older = run_dir / "checkpoints" / "step_6"  # unpadded, as a user writes it
    proc = run_train(run_dir, *SAVES, f"checkpoint.resume={older}", "stop_at_step=7", *BATCH, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = error_line(proc.stderr)
    assert f"checkpoint.resume={older} is step 6" in error and tag(8) in error and "checkpoint.rewind=true" in error
    assert checkpoint_names(run_dir) == [tag(6), tag(8)]
    assert rows(run_dir) == rows(saved_run)
    assert not (run_dir / "rewound").exists()


def test_rewind_sets_the_later_steps_aside(saved_run, tmp_path):
    run_dir = copy_run(saved_run, tmp_path)
    older = run_dir / "checkpoints" / tag(6)
    run_train(run_dir, *SAVES, f"checkpoint.resume={older}", "checkpoint.rewind=true", "stop_at_step=7", *BATCH)
    # keep=2: the checkpoint resumed from stays, and `latest` names the newest.
    assert checkpoint_names(run_dir) == [tag(6), tag(7)]
    assert (run_dir / "checkpoints" / "latest").read_text() == tag(7)
    assert [row["step"] for row in rows(run_dir)] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert losses(run_dir) == pytest.approx({s: v for s, v in losses(saved_run).items() if s <= 7}, rel=1e-6)
    [aside] = (run_dir / "rewound").iterdir()
    assert [row["step"] for row in rows(aside)] == [7, 8]
    assert rows(aside) == rows(saved_run)[-2:]
    assert checkpoint_names(aside) == [tag(8)]


def test_fallback_past_a_damaged_checkpoint_keeps_the_one_it_resumed_from(saved_run, tmp_path):
    run_dir = copy_run(saved_run, tmp_path)
    damaged = run_dir / "checkpoints" / tag(8) / "mp_rank_00_model_states.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])
    proc = run_train(run_dir, *SAVES, "stop_at_step=7", *BATCH)
    assert f"resumed from {run_dir / 'checkpoints' / tag(6)} at step 6" in proc.stderr
    # resume=auto leaves a damaged checkpoint in place until the run saves its step again; the rows after step 6
    # move aside all the same, so metrics.jsonl holds each step once.
    assert checkpoint_names(run_dir) == [tag(6), tag(7), tag(8)]
    assert (run_dir / "checkpoints" / "latest").read_text() == tag(8)
    assert [row["step"] for row in rows(run_dir)] == [0, 1, 2, 3, 4, 5, 6, 7]
    [aside] = (run_dir / "rewound").iterdir()
    assert [row["step"] for row in rows(aside)] == [7, 8]


def test_resume_reports_a_changed_schedule(saved_run, tmp_path):
    run_dir = copy_run(saved_run, tmp_path)
    proc = run_train(run_dir, *SAVES, "steps=10", "optim.lr=2e-3", "stop_at_step=9", *BATCH)
    [warning] = [line for line in proc.stderr.splitlines() if "with a changed config" in line]
    assert warning.endswith("(from step 9 on): optim.lr: 0.001 -> 0.002, steps: 8 -> 10"), warning


# Eight steps in two phases of a 12-step run, one checkpoint at step 8.
PHASES = "curriculum.phases=[{name: a, steps: 4}, {name: b}]"
PHASED = ("steps=12", "checkpoint.every=8", "wandb.mode=disabled", *BATCH)


@pytest.fixture(scope="module")
def phased_run(tmp_path_factory) -> Path:
    """Refused resumes change nothing in it, so the tests below share it."""
    run_dir = tmp_path_factory.mktemp("phased") / "run"
    run_train(run_dir, *PHASED, PHASES, "stop_at_step=8")
    return run_dir


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ((PHASES, "seed=7"), "seed=7 but checkpoint {path} was trained with seed=1234"),
        ((PHASES, "data.successors_per_token=3"), "data.successors_per_token=3 but checkpoint {path} was trained with"),
        # A longer first phase would put steps 5-8, run in phase b, back into phase a.
        (
            ("curriculum.phases=[{name: a, steps: 9}, {name: b}]",),
            "the config changes the curriculum's first 8 steps, which checkpoint {path} has run: "
            "a steps 1-4 seq_len 64 batch 8 weights {}; b steps 5-8 seq_len 64 batch 8 weights {} -> "
            "a steps 1-8 seq_len 64 batch 8 weights {}",
        ),
        ((PHASES, "global_batch_size=16"), "-> a steps 1-4 seq_len 64 batch 16 weights {}; b steps 5-8"),
    ],
)
def test_resume_refuses_a_change_to_the_steps_already_taken(phased_run, overrides, expected):
    proc = run_train(phased_run, *PHASED, *overrides, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert expected.replace("{path}", str(phased_run / "checkpoints" / tag(8))) in error_line(proc.stderr)
    assert not (phased_run / "rewound").exists()
