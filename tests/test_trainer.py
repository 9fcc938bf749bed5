"""Real DeepSpeed runs on CPU (gloo): ZeRO stages agree with one process, resume is exact, crashes and
non-finite losses leave usable checkpoints, W&B writes an offline run."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from tqdm import tqdm

from nopetrain.checkpoint import INCOMPLETE_PREFIX, complete_checkpoints
from nopetrain.metrics import setup_logging
from nopetrain.trainer import train

from .helpers import REPO, WANDB, composed, losses, run_train, set_one_rank_env, subprocess_env, train_command

pytestmark = pytest.mark.slow

# Global batch 8 = 1 process x 2 accumulation x 4, or 2 processes x 1 x 4.
BATCH = ("global_batch_size=8", "micro_batch_size=4", "seq_len=64")
# QK-norm gains are read by the fused attention prologue; ZeRO-3 must gather them like any other parameter.
QK_NORM = "model.qk_norm=qk"


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single") / "run"
    run_train(run_dir, "steps=5", QK_NORM, *BATCH)
    return losses(run_dir)


@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3"])
def test_two_processes_match_one_process(tmp_path, stage, one_process_run):
    run_dir = tmp_path / "run"
    # Threshold 0: ZeRO-3 partitions even the smallest parameters (norm gains), which it otherwise keeps whole.
    partition_all = "+deepspeed.extra.zero_optimization.stage3_param_persistence_threshold=0"
    proc = run_train(run_dir, "steps=5", QK_NORM, f"deepspeed={stage}", partition_all, *BATCH, nproc=2)
    # ZeRO-3's collectives made torch print a FutureWarning on every step.
    assert "FutureWarning" not in proc.stderr
    two = losses(run_dir)
    assert sorted(two) == [1, 2, 3, 4, 5]
    for step, loss in one_process_run.items():
        assert two[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), f"step {step}"
    assert one_process_run[5] < one_process_run[1]


def test_resume_continues_the_run(tmp_path):
    straight = tmp_path / "straight"
    run_train(straight, "steps=10", *BATCH)
    resumed = tmp_path / "resumed"
    run_train(resumed, "steps=10", "stop_at_step=5", *BATCH)
    assert [p.name for p in complete_checkpoints(resumed / "checkpoints")] == ["step_00000005"]
    run_train(resumed, "steps=10", *BATCH)
    # Bit-exact: torch's AdamW derives beta^t from the step it restores (DeepSpeed's CPU Adam, used until
    # 2026-12-02, kept a running float32 product of it and drifted by an ulp after a resume).
    final = "checkpoints/step_00000010/mp_rank_00_model_states.pt"
    straight_weights = torch.load(straight / final, weights_only=True)["module"]
    resumed_weights = torch.load(resumed / final, weights_only=True)["module"]
    assert straight_weights.keys() == resumed_weights.keys()
    for name, weight in straight_weights.items():
        assert torch.equal(resumed_weights[name], weight), name
    assert losses(resumed) == losses(straight)
    state = json.loads((resumed / "checkpoints" / "step_00000010" / "trainer_state.json").read_text())
    assert state["step"] == 10
    assert state["tokens_seen"] == 10 * 8 * 64
    assert state["config"]["model"]["name"] == "tiny"


def test_two_process_zero3_resume(tmp_path):
    straight = tmp_path / "straight"
    run_train(straight, "steps=4", "deepspeed=zero3", *BATCH, nproc=2)
    resumed = tmp_path / "resumed"
    run_train(resumed, "steps=4", "stop_at_step=2", "deepspeed=zero3", *BATCH, nproc=2)
    run_train(resumed, "steps=4", "deepspeed=zero3", *BATCH, nproc=2)
    assert losses(resumed) == losses(straight)


def test_resume_refuses_a_changed_architecture(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, "steps=1", *BATCH)
    proc = run_train(run_dir, "steps=2", "model.num_layers=2", *BATCH, check=False)
    assert proc.returncode == 2
    assert "model.num_layers=2" in proc.stderr and "step_00000001" in proc.stderr
    fresh = run_train(run_dir, "steps=2", "checkpoint.resume=none", *BATCH, check=False)
    assert fresh.returncode == 2 and "checkpoint.resume=none" in fresh.stderr


def test_crash_during_save_leaves_previous_checkpoint_usable(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        train_command(run_dir, "wandb.mode=disabled", "steps=200", "checkpoint.every=1", *BATCH),
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    root = run_dir / "checkpoints"
    deadline = time.monotonic() + 300
    try:
        # Kill as soon as a save is in flight after at least two complete ones: the worst moment to crash.
        while time.monotonic() < deadline and proc.poll() is None:
            if len(complete_checkpoints(root)) >= 2 and any(root.glob(INCOMPLETE_PREFIX + "*")):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"training ended by itself with {proc.returncode}"
    assert any(root.glob(INCOMPLETE_PREFIX + "*")), "the kill did not land during a save"
    last_complete = complete_checkpoints(root)[-1]
    step = int(last_complete.name.split("_")[1])

    proc = run_train(run_dir, "steps=200", f"stop_at_step={step + 1}", "checkpoint.every=1", *BATCH)
    assert f"resumed from {last_complete}" in proc.stderr
    assert not any(root.glob(INCOMPLETE_PREFIX + "*"))
    assert complete_checkpoints(root)[-1].name == f"step_{step + 1:08d}"


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, "steps=4", "checkpoint.every=4", *BATCH)
    # A learning rate this large sends the weights to infinity after one update; every loss after it is NaN.
    proc = run_train(
        run_dir, "steps=20", "optim.lr=1e30", "max_consecutive_nonfinite=3", "checkpoint.every=1", *BATCH, check=False
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("nopetrain: error:")]
    assert len(error) == 1
    assert "3 optimizer steps in a row" in error[0]
    assert "non-finite" in error[0]
    assert "update skipped" in proc.stderr
    last_good = complete_checkpoints(run_dir / "checkpoints")[-1]
    assert last_good.name in error[0]
    # The last good checkpoint still trains.
    run_train(run_dir, "steps=20", f"checkpoint.resume={last_good}", "stop_at_step=7", *BATCH)


def test_wandb_offline_run_and_saved_config(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, "steps=2", WANDB, *BATCH)
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))
    saved = (run_dir / "config.yaml").read_text()
    assert "no_rope_layer_interval: 4" in saved and "global_batch_size: 8" in saved


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_resume_on_fewer_processes_continues_the_run(tmp_path, stage, one_process_run):
    # Two processes stop after 2 steps; one process resumes from DeepSpeed's universal form of the checkpoint and
    # must continue as the one-process run did (the global batches are the same).
    run_dir = tmp_path / "run"
    run_train(run_dir, "steps=5", "stop_at_step=2", QK_NORM, f"deepspeed={stage}", *BATCH, nproc=2)
    proc = run_train(run_dir, "steps=5", QK_NORM, f"deepspeed={stage}", *BATCH)
    assert "written by 2 process(es), this run has 1" in proc.stderr
    resumed = losses(run_dir)
    for step, loss in one_process_run.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), f"step {step}"


def test_nothing_is_compiled_on_cpu(tmp_path):
    # DeepSpeed's CPU Adam and shared-memory all-reduce are C++ ops it builds on first start (minutes, silently);
    # on CPU torch's AdamW and gloo stand in, so a fresh machine's first step comes at once.
    extensions = tmp_path / "torch_extensions"
    env = dict(subprocess_env(), TORCH_EXTENSIONS_DIR=str(extensions))
    command = train_command(tmp_path / "run", "steps=2", *BATCH, nproc=2)
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not extensions.exists() or not any(extensions.iterdir()), sorted(extensions.rglob("*"))
    assert "built successfully" not in proc.stdout + proc.stderr


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_are_written_around_the_progress_bar(tmp_path, monkeypatch):
    # A plain stream handler appends a line to the bar's own ("  10%|#  | 1/10 [00:00<...]10:00:00 rank0 INFO ...").
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    setup_logging(0, tmp_path)
    bar = tqdm(total=10, file=sys.stderr, mininterval=0)
    bar.update(1)
    logging.getLogger("nopetrain").info("checkpoint saved")
    bar.close()
    shown = terminal.getvalue()
    before = shown[: shown.index("checkpoint saved")]
    visible_line = re.split(r"[\r\n]", before)[-1]
    assert re.fullmatch(r"\d\d:\d\d:\d\d rank0 INFO ", visible_line), repr(visible_line)
    assert "1/10" in shown


def test_a_finished_run_destroys_the_process_group_it_made(tmp_path, monkeypatch):
    # Left to the interpreter's teardown, gloo's threads aborted a rank at exit (-6, "terminate called without an
    # active exception") after a 2-rank ZeRO-3 run had saved its last checkpoint.
    set_one_rank_env(monkeypatch)
    cfg = composed(f"run.dir={tmp_path}", "precision=fp32", "data=synthetic", "curriculum=single", "steps=1")
    cfg.wandb.mode = "disabled"
    assert train(cfg)["step"] == 1
    assert not dist.is_initialized()


def test_profile_records_a_window_of_steps(tmp_path):
    """profile.steps=2 from step 2: a Chrome trace naming each recorded step (and no other), with memory events,
    and the ops ranked by the memory they allocate; the run's losses are those of a run without it."""
    profiled, plain = tmp_path / "profiled", tmp_path / "plain"
    run_train(profiled, "steps=4", "profile.steps=2", "profile.start=2", *BATCH)
    trace = json.loads((profiled / "profile" / "trace_rank_0.json").read_text())
    steps = {event["name"] for event in trace["traceEvents"] if event.get("name", "").startswith("train_step")}
    assert steps == {"train_step 2", "train_step 3"}
    assert any(event.get("name") == "[memory]" for event in trace["traceEvents"])
    assert "Self CPU Mem" in (profiled / "profile" / "memory_rank_0.txt").read_text()
    run_train(plain, "steps=4", *BATCH)
    assert losses(profiled) == losses(plain)
