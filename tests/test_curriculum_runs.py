"""Curricula in real runs: phase changes and the DroPE switch at their exact step, under ZeRO-1/2/3 with several
processes, through interruptions, with the optimizer reset; recalibrating a local Hugging Face model."""

from __future__ import annotations

import json

import pytest
import torch

from nopetrain.config import ModelConfig
from nopetrain.export import export
from nopetrain.hf import load_hf_state_dict
from nopetrain.model import Transformer

from .helpers import corpus_overrides, losses, run_train

pytestmark = pytest.mark.slow

BATCH = ("global_batch_size=8", "micro_batch_size=4", "seq_len=64")
# Phase a: web only, 3 steps; phase b: math and code, twice the batch. RoPE dropped before step index 5.
CURRICULUM = (
    "curriculum.phases=[{name: a, steps: 3, weights: {web: 1}}, "
    "{name: b, weights: {math: 1, code: 1}, global_batch_size: 16}]",
    "curriculum.drope.at_step=5",
    "curriculum.drope.qk_norm=qk",
    "curriculum.drope.lr=1e-3",
    "curriculum.drope.reset_optimizer=true",
)


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def trainer_state(run_dir, step):
    return json.loads((run_dir / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").read_text())


def test_interrupted_runs_equal_a_straight_run_across_phase_change_and_switch(tmp_path, corpus):
    args = ["steps=8", *corpus_overrides(corpus), *CURRICULUM, "micro_batch_size=4", "global_batch_size=8"]
    straight = tmp_path / "straight"
    run_train(straight, *args)
    # Stops just before and at the phase change (after 2 and 3 steps), just before, at and just after the switch.
    interrupted = tmp_path / "interrupted"
    for stop in (2, 3, 4, 5, 6):
        run_train(interrupted, *args, f"stop_at_step={stop}")
    run_train(interrupted, *args)
    assert losses(interrupted) == losses(straight)

    events = [(row["step"], row["event"]) for row in rows(straight) if "event" in row]
    assert events == [(0, "phase"), (3, "phase"), (5, "drope")]
    # Resumed before, at and after both events: each is marked once, at the straight run's step.
    assert [(row["step"], row["event"]) for row in rows(interrupted) if "event" in row] == events
    metrics = {row["step"]: row for row in rows(straight) if "loss" in row}
    # Phase a draws web only; phase b (twice the batch: 16 sequences a step) math and code only.
    assert metrics[3]["samples/web"] == 3 * 8 and metrics[3]["samples/math"] == metrics[3]["samples/code"] == 0
    assert metrics[8]["samples/web"] == 3 * 8
    assert metrics[8]["samples/math"] + metrics[8]["samples/code"] == 5 * 16
    assert metrics[8]["tokens_seen"] == (3 * 8 + 5 * 16) * 64
    assert [metrics[step]["nope"] for step in range(1, 9)] == [0, 0, 0, 0, 0, 1, 1, 1]
    before, after = trainer_state(straight, 8), trainer_state(interrupted, 8)
    assert before["drope_step"] == after["drope_step"] == 5
    assert after["model_config"]["no_rope_layers"] == [0, 0, 0, 0] and after["model_config"]["qk_norm"] == "qk"
    assert after["config"]["model"]["no_rope_layer_interval"] == 4


SWITCH = ("steps=4", "curriculum.drope.at_step=2", "curriculum.drope.qk_norm=qk", "curriculum.drope.lr=2e-3")


@pytest.fixture(scope="module")
def one_process_switch(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("switch") / "run"
    run_train(run_dir, *SWITCH, *BATCH)
    return losses(run_dir)


@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3"])
def test_switch_under_zero_with_two_processes_matches_one_process(tmp_path, stage, one_process_switch):
    run_dir = tmp_path / "run"
    partition_all = "+deepspeed.extra.zero_optimization.stage3_param_persistence_threshold=0"
    run_train(run_dir, *SWITCH, *BATCH, f"deepspeed={stage}", partition_all, nproc=2)
    two = losses(run_dir)
    # After the switch the QK-norm gains train: equal losses mean ZeRO partitioned and updated them correctly.
    for step, loss in one_process_switch.items():
        assert two[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), f"step {step}"
    state = trainer_state(run_dir, 4)
    assert state["drope_step"] == 2 and state["model_config"]["qk_norm"] == "qk"


RECALIBRATION = ("steps=5", "curriculum.drope.at_step=3", "curriculum.drope.qk_norm=q", "curriculum.drope.lr=2e-3")


def test_drope_started_on_a_rope_checkpoint_takes_the_steps_of_a_drope_run(tmp_path):
    # The paper recalibrates a RoPE model: a RoPE run's checkpoint at the drop step lacks the QK-norm gains that a run
    # with the DroPE curriculum builds from its first step, and once loaded the DroPE run must go on as if it had
    # been the DroPE run all along (same weights, data position and RNG; gains at 1, optimizer reset).
    straight = tmp_path / "straight"
    run_train(straight, *RECALIBRATION, *BATCH, "curriculum.drope.reset_optimizer=true")
    rope = tmp_path / "rope"
    run_train(rope, "steps=5", *BATCH, "checkpoint.keep_steps=[3]", "checkpoint.keep=1")
    assert sorted(p.name for p in (rope / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000005"]
    start = rope / "checkpoints" / "step_00000003"
    refused = run_train(tmp_path / "kept", *RECALIBRATION, *BATCH, f"checkpoint.resume={start}", check=False)
    assert refused.returncode != 0 and "curriculum.drope.reset_optimizer=true" in refused.stderr.splitlines()[-1]
    branched = tmp_path / "drope"
    run_train(branched, *RECALIBRATION, *BATCH, "curriculum.drope.reset_optimizer=true", f"checkpoint.resume={start}")
    before, after = losses(straight), losses(branched)
    assert sorted(after) == [4, 5]
    for step in (4, 5):
        assert after[step] == pytest.approx(before[step], rel=1e-6), f"step {step}"
    state = trainer_state(branched, 5)
    assert state["drope_step"] == 3 and state["model_config"]["qk_norm"] == "q"
    assert state["wandb_run_id"] != trainer_state(rope, 5)["wandb_run_id"]


def norm_gain(run_dir, step):
    states = torch.load(run_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt", weights_only=False)
    return states["module"]["layers.0.mlp_norm.weight"]


@pytest.mark.parametrize("reset", [True, False])
def test_optimizer_reset_makes_the_first_recalibration_update_lr_sized(tmp_path, reset):
    # Adam's first step from zeroed moments moves every parameter by exactly lr (sign of the gradient); norm gains
    # have no weight decay, so that is visible in their checkpoints before and after the switch step.
    run_dir = tmp_path / "run"
    overrides = [f"curriculum.drope.reset_optimizer={reset}", "checkpoint.every=1", "checkpoint.keep=4"]
    run_train(run_dir, *SWITCH, *BATCH, *overrides)
    delta = (norm_gain(run_dir, 3) - norm_gain(run_dir, 2)).abs()
    # Elements whose gradient is near Adam's eps move a little less; nearly all others move by lr to 1%.
    lr_sized = ((delta - 2e-3).abs() <= 2e-5).float().mean().item()
    assert (lr_sized > 0.9) == reset, lr_sized


def test_recalibrate_a_local_hugging_face_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.SmolLM3Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        no_rope_layer_interval=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    folder = tmp_path / "smollm3"
    transformers.SmolLM3ForCausalLM(hf_config).save_pretrained(folder)
    run_dir = tmp_path / "run"
    # lr 0: the checkpoint after one step must hold exactly the pretrained weights (plus unit QK-norm gains).
    proc = run_train(
        run_dir, f"init_from=hf:{folder}", "curriculum=drope_recalibrate", "curriculum.drope.lr=0", "steps=1", *BATCH
    )
    assert f"initialised from {folder}" in proc.stderr
    assert "DroPE from step 1" in proc.stderr
    saved = torch.load(run_dir / "checkpoints" / "step_00000001" / "mp_rank_00_model_states.pt", weights_only=False)
    for key, value in load_hf_state_dict(folder).items():
        torch.testing.assert_close(saved["module"][key], value, rtol=0, atol=0)
    assert torch.equal(saved["module"]["layers.0.attn.q_norm_weight"], torch.ones(16))
    state = trainer_state(run_dir, 1)
    assert state["model_config"]["no_rope_layers"] == [0, 0, 0, 0] and state["model_config"]["vocab_size"] == 256


@pytest.mark.parametrize("family", ["SmolLM3", "Qwen2"])
def test_recalibrated_hugging_face_model_exports_back_to_transformers(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls = getattr(transformers, f"{family}Config"), getattr(transformers, f"{family}ForCausalLM")
    hf_config = config_cls(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    folder = tmp_path / family
    model_cls(hf_config).save_pretrained(folder)
    run_dir = tmp_path / "run"
    run_train(run_dir, f"init_from=hf:{folder}", "curriculum=drope_recalibrate", "steps=3", *BATCH)
    checkpoint_dir = run_dir / "checkpoints" / "step_00000003"
    export(checkpoint_dir, tmp_path / "export")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", trust_remote_code=True)

    state = trainer_state(run_dir, 3)
    ours = Transformer(ModelConfig(**state["model_config"])).eval()
    saved = torch.load(checkpoint_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    ours.load_state_dict(saved)
    tokens = torch.randint(256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(exported(tokens).logits, ours(tokens), atol=1e-5, rtol=1e-5)
    assert all(not layer.attn.use_rope and layer.attn.qk_norm == "qk" for layer in ours.layers)
