"""Training on the default corpus through the streaming loader: exact resume across ranks and workers, worker
count changes, and a corrupt shard stopping the run with one line."""

from __future__ import annotations

import json
import shutil

import pytest

from .helpers import corpus_overrides, losses, run_train

pytestmark = pytest.mark.slow

BATCH = ("global_batch_size=8", "micro_batch_size=4")


def test_two_ranks_two_workers_resume_exactly(tmp_path, corpus):
    data = [*corpus_overrides(corpus), "data.num_workers=2", *BATCH]
    straight = tmp_path / "straight"
    run_train(straight, "steps=6", *data, nproc=2)
    resumed = tmp_path / "resumed"
    run_train(resumed, "steps=6", "stop_at_step=3", *data, nproc=2)
    run_train(resumed, "steps=6", *data, nproc=2)
    assert losses(resumed) == losses(straight)
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(rows[-1][f"samples/{name}"] > 0 for name in ("web", "code", "math"))


def test_worker_count_change_on_resume_continues(tmp_path, corpus):
    run_dir = tmp_path / "run"
    run_train(run_dir, "steps=4", "stop_at_step=2", *corpus_overrides(corpus), "data.num_workers=2", *BATCH)
    proc = run_train(run_dir, "steps=4", *corpus_overrides(corpus), "data.num_workers=1", *BATCH)
    assert "merged over 1 rank(s) x 2 worker(s)" in proc.stderr
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]


def test_corrupt_shard_stops_the_run_naming_it(tmp_path, corpus):
    math_copy = tmp_path / "math"
    shutil.copytree(corpus / "train" / "math", math_copy)
    # Every shard cut short: whichever the shuffled order reads first is bad.
    for shard in math_copy.glob("*.tar"):
        shard.write_bytes(shard.read_bytes()[:1000])
    overrides = [*corpus_overrides(corpus), f"data.sources.math.path={math_copy}", "data.sources.math.weight=10"]
    proc = run_train(tmp_path / "run", "steps=20", *overrides, *BATCH, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("nopetrain: error:")]
    assert len(error) == 1
    assert str(math_copy) in error[0] and ".tar" in error[0]


def test_resume_on_fewer_processes_re_splits_the_data(tmp_path, corpus):
    run_dir = tmp_path / "run"
    data = [*corpus_overrides(corpus), "data.num_workers=1", *BATCH]
    run_train(run_dir, "steps=4", "stop_at_step=2", *data, nproc=2)
    proc = run_train(run_dir, "steps=4", *data)
    assert "merged over 2 rank(s) x 1 worker(s)" in proc.stderr
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]
