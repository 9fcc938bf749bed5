"""`nopetrain-export` on real checkpoints: transformers computes the logits our model does, the tokenizer
round-trips, and broken inputs are refused with one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nopetrain.config import ModelConfig
from nopetrain.eval import logit_scale
from nopetrain.export import main
from nopetrain.model import KVCache, Transformer
from tests.helpers import REPO, corpus_overrides, run_train, subprocess_env

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

STEP = "step_00000002"


def train(tmp_path_factory: pytest.TempPathFactory, name: str, *overrides: str, nproc: int = 1) -> Path:
    run_dir = tmp_path_factory.mktemp(name)
    run_train(run_dir, "steps=2", *overrides, nproc=nproc)
    return run_dir / "checkpoints" / STEP


@pytest.fixture(scope="module")
def nope_checkpoint(tmp_path_factory) -> Path:
    return train(tmp_path_factory, "nope", "model.no_rope_layer_interval=2")


@pytest.fixture(scope="module")
def qk_checkpoint(tmp_path_factory) -> Path:
    overrides = ("model.qk_norm=qk", "model.attn_logit_scale=1.3", "model.sliding_window=4")
    return train(tmp_path_factory, "qk", *overrides, "model.tie_embeddings=false")


@pytest.fixture(scope="module")
def drope_run(tmp_path_factory) -> Path:
    """Checkpoints before (dormant query gains) and after (all NoPE, query-only norm) a DroPE switch at step 1."""
    overrides = ("checkpoint.every=1", "curriculum.drope.at_step=1", "curriculum.drope.qk_norm=q")
    return train(tmp_path_factory, "drope", *overrides).parent


@pytest.fixture(scope="module")
def zero3_checkpoint(tmp_path_factory) -> Path:
    overrides = ("deepspeed=zero3", "micro_batch_size=4", "model.no_rope_layer_interval=2", "model.sliding_window=4")
    return train(tmp_path_factory, "zero3", *overrides, nproc=2)


@pytest.fixture(scope="module")
def tokenizer_checkpoint(tmp_path_factory, corpus) -> Path:
    return train(tmp_path_factory, "tok", *corpus_overrides(corpus))


def trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def our_model(checkpoint: Path) -> Transformer:
    """Our Transformer with the checkpoint's weights, read without the exporter: the whole module state from
    ZeRO-1/2's model file, or DeepSpeed's gather of a ZeRO-3 partition."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    cfg = ModelConfig(**trainer_state(checkpoint)["model_config"])
    model_states = checkpoint / "mp_rank_00_model_states.pt"
    if model_states.is_file():
        weights = torch.load(model_states, map_location="cpu", weights_only=False)["module"]
    else:
        weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    gains = {key.rsplit(".", 1)[-1] for key in weights if key.endswith("_norm_weight")}
    dormant = "qk" if "k_norm_weight" in gains else "q" if gains else "none"
    model = Transformer(cfg, extra_qk_norm=dormant)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def export(checkpoint: Path, output: Path, *args: str) -> Path:
    assert main(["--checkpoint", str(checkpoint), "--output", str(output), *args]) == 0
    return output


def load_hf(folder: Path, **kwargs) -> torch.nn.Module:
    """The exported model through transformers' auto classes, with nothing missing, unexpected or mismatched."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **kwargs)
    assert not any(info.values()), info
    return model.eval()


def logits(model: torch.nn.Module, vocab_size: int) -> torch.Tensor:
    # Longer than the sliding window (4), so windowed layers attend differently from global ones.
    ids = torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids) if isinstance(model, Transformer) else model(input_ids=ids).logits
    return out.float()


def assert_same_logits(hf: torch.nn.Module, ours: Transformer, atol: float = 1e-5) -> None:
    vocab = ours.config.vocab_size
    torch.testing.assert_close(logits(hf, vocab), logits(ours, vocab), atol=atol, rtol=0)


def assert_other_logits(hf: torch.nn.Module, ours: Transformer) -> None:
    """A model that differs in one setting gives logits far outside the tolerance, so the comparison is a test."""
    vocab = ours.config.vocab_size
    assert (logits(hf, vocab) - logits(ours, vocab)).abs().max() > 1e-3


def assert_same_generation(hf: torch.nn.Module, ours: Transformer) -> None:
    """Greedy decoding through transformers' KV cache (windowed layers keep only the window) picks the tokens our
    model picks from full recomputation, with the logits of our own KV-cache decoding at every step. The prompt (6
    tokens) and the 10 generated ones run to twice a training context of 8: past it a logit scale acts, and cached
    positions keep the scale of the length they were fed at, so there only the cached logits can match exactly."""
    ids = torch.randint(0, ours.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)
        recomputed = ids
        for _ in range(10):
            recomputed = torch.cat([recomputed, ours(recomputed)[:, -1:].argmax(-1)], dim=1)
        cache = KVCache(len(ours.layers))
        cached_logits = [ours(ids, cache=cache)[:, -1]]
        for token in out.sequences[:, ids.shape[1] : -1].unbind(1):
            cached_logits.append(ours(token[:, None], cache=cache)[:, -1])
    assert out.sequences.tolist() == recomputed.tolist()
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(cached_logits).float(), atol=1e-5, rtol=0)


def test_nope_cadence_exports_as_plain_smollm3(nope_checkpoint, tmp_path):
    output = tmp_path / "hf"
    cmd = [sys.executable, "-m", "nopetrain.export", "--checkpoint", str(nope_checkpoint), "--output", str(output)]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "as SmolLM3, float32" in proc.stdout
    assert "has no tokenizer" in proc.stderr  # synthetic data: no tokenizer to export
    assert sorted(p.name for p in output.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "smollm3" and "auto_map" not in config
    assert config["no_rope_layers"] == [1, 0, 1, 0]
    assert config["use_sliding_window"] is False

    hf = load_hf(output)
    assert type(hf).__name__ == "SmolLM3ForCausalLM"
    assert [layer.self_attn.use_rope for layer in hf.model.layers] == [1, 0, 1, 0]
    ours = our_model(nope_checkpoint)
    assert_same_logits(hf, ours)
    ours.layers[1].attn.use_rope = True
    assert_other_logits(hf, ours)


def test_bfloat16_export(nope_checkpoint, tmp_path):
    hf = load_hf(export(nope_checkpoint, tmp_path / "hf", "--dtype", "bfloat16"))
    assert hf.dtype == torch.bfloat16
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert_same_logits(hf, our_model(nope_checkpoint), atol=3e-2)


def test_qk_norm_and_logit_scale_use_shipped_code(qk_checkpoint, tmp_path):
    output = export(qk_checkpoint, tmp_path / "hf")
    config = json.loads((output / "config.json").read_text())
    assert (config["model_type"], config["qk_norm"], config["attn_logit_scale"]) == ("nopetrain", "qk", 1.3)
    assert config["layer_types"] == ["sliding_attention"] * 3 + ["full_attention"]  # tiny: NoPE every 4th layer
    assert config["tie_word_embeddings"] is False
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForCausalLM.from_pretrained(output)

    hf = load_hf(output, trust_remote_code=True)
    assert type(hf).__name__ == "NopetrainForCausalLM"
    ours = our_model(qk_checkpoint)
    assert_same_logits(hf, ours)
    assert_same_generation(hf, ours)
    ours.config.attn_logit_scale = 1.0
    assert_other_logits(hf, ours)


def test_drope_checkpoints_before_and_after_the_switch(drope_run, tmp_path):
    before, after = drope_run / "step_00000001", drope_run / STEP
    # Before the switch the query gains exist but do not act: plain SmolLM3 without them.
    config = json.loads((export(before, tmp_path / "before") / "config.json").read_text())
    assert config["model_type"] == "smollm3"
    assert_same_logits(load_hf(tmp_path / "before"), our_model(before))

    config = json.loads((export(after, tmp_path / "after") / "config.json").read_text())
    assert (config["model_type"], config["qk_norm"], config["no_rope_layers"]) == ("nopetrain", "q", [0, 0, 0, 0])
    hf = load_hf(tmp_path / "after", trust_remote_code=True)
    assert [(attn.q_norm is None, attn.k_norm is None) for attn in (layer.self_attn for layer in hf.model.layers)] == [
        (False, True)
    ] * 4
    ours = our_model(after)
    assert_same_logits(hf, ours)
    assert_same_generation(hf, ours)
    ours.layers[0].attn.qk_norm = "none"
    assert_other_logits(hf, ours)

    # A logit scale fitted by the evaluation (beside the checkpoint) is exported and applied by the shipped code:
    # the test inputs (24 tokens) are 3x the context of 8 it is written for.
    documents = [{"source": "heldout/web", "documents": 1, "tokens": 16}]
    logit_scale.write(
        after / logit_scale.FILE, logit_scale.FittedScale(0.4, 8, [16], [1.0], [1.0], -0.4, 2.0, None, documents)
    )
    config = json.loads((export(after, tmp_path / "scaled") / "config.json").read_text())
    assert (config["logit_scale_coef"], config["train_context"]) == (0.4, 8)
    hf = load_hf(tmp_path / "scaled", trust_remote_code=True)
    ours = our_model(after)
    assert_other_logits(hf, ours)
    ours.config.logit_scale_coef, ours.config.train_context = 0.4, 8
    assert_same_logits(hf, ours)
    assert_same_generation(hf, ours)


def test_zero3_two_process_checkpoint(zero3_checkpoint, tmp_path):
    assert not (zero3_checkpoint / "mp_rank_00_model_states.pt").exists()  # partitioned, nothing holds it whole
    config = json.loads((export(zero3_checkpoint, tmp_path / "hf") / "config.json").read_text())
    # SmolLM3 windows its NoPE layers by default; ours are the RoPE layers, written out per layer.
    assert config["layer_types"] == ["sliding_attention", "full_attention"] * 2
    assert (config["use_sliding_window"], config["sliding_window"]) == (True, 4)
    hf = load_hf(tmp_path / "hf")
    ours = our_model(zero3_checkpoint)
    assert_same_logits(hf, ours)
    assert_same_generation(hf, ours)
    ours.layers[0].attn.sliding_window = None
    assert_other_logits(hf, ours)


TEXTS = [
    "Hello world",
    "def f(x):\n    return x  +  1\n",
    "  two leading spaces, two trailing  ",
    "\tindented\n\n\nblank lines",
    "12345 + 678 = 13023",
    "bytes: é ü 中文 😀",
    "",
]


def test_tokenizer_round_trips(tokenizer_checkpoint, corpus, tmp_path):
    import sentencepiece

    output = export(tokenizer_checkpoint, tmp_path / "hf")
    sp = sentencepiece.SentencePieceProcessor(
        model_file=str(tokenizer_checkpoint.parents[1] / trainer_state(tokenizer_checkpoint)["tokenizer"])
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(output)
    documents = [
        json.loads(line)["text"]
        for path in sorted(corpus.glob("raw/heldout/*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    assert documents
    ties = 0
    for text in TEXTS + documents:
        ids, hf_ids = sp.encode(text), tokenizer.encode(text)  # no BOS: training documents never start with one
        assert tokenizer.decode(ids) == sp.decode(ids) == tokenizer.decode(hf_ids), text
        if hf_ids != ids:
            # Only where two segmentations score the same: sentencepiece sums scores in float32, tokenizers in
            # float64, so rounding breaks such ties differently (runs like "*****").
            assert sum(map(sp.get_score, hf_ids)) == pytest.approx(sum(map(sp.get_score, ids)), abs=1e-4), text
            ties += 1
    assert ties <= len(documents) // 10
    ids = {name: getattr(tokenizer, f"{name}_token_id") for name in ("unk", "bos", "eos", "pad")}
    assert ids == {"unk": 0, "bos": 1, "eos": 2, "pad": 3}
    config = json.loads((output / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 3)
    assert_same_logits(load_hf(output), our_model(tokenizer_checkpoint))


def broken_checkpoint(source: Path, tmp_path: Path, case: str) -> tuple[Path, Path]:
    """A copy of a real checkpoint broken as `case` names; returns it and the path the error must name."""
    checkpoint = tmp_path / "run" / "checkpoints" / STEP
    if case == "missing":
        return checkpoint, checkpoint
    shutil.copytree(source, checkpoint)
    if case == "no_trainer_state":
        (checkpoint / "trainer_state.json").unlink()
        return checkpoint, checkpoint
    if case == "no_shards":
        for shard in checkpoint.glob("*_states.pt"):
            shard.unlink()
        return checkpoint, checkpoint
    if case == "truncated_shard":
        shard = checkpoint / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        shard.write_bytes(shard.read_bytes()[:1000])
        return checkpoint, checkpoint
    assert case == "missing_tokenizer"
    state = trainer_state(checkpoint)
    state["tokenizer"] = "tokenizer/tokenizer.model"
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    return checkpoint, tmp_path / "run" / "tokenizer" / "tokenizer.model"


@pytest.mark.parametrize("case", ["missing", "no_trainer_state", "no_shards", "truncated_shard", "missing_tokenizer"])
def test_broken_checkpoints_are_refused_in_one_line(nope_checkpoint, tmp_path, capsys, case):
    checkpoint, named = broken_checkpoint(nope_checkpoint, tmp_path, case)
    output = tmp_path / "out" / "hf"
    assert main(["--checkpoint", str(checkpoint), "--output", str(output)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nopetrain-export")]
    assert len(errors) == 1 and errors[0].startswith(f"nopetrain-export: error: {named}"), errors
    # The tokenizer is found missing after writing has begun; nothing of it may remain.
    assert not output.exists() and not any(output.parent.glob("*"))


def test_existing_output_is_left_alone(nope_checkpoint, tmp_path, capsys):
    output = tmp_path / "hf"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    assert main(["--checkpoint", str(nope_checkpoint), "--output", str(output)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"nopetrain-export: error: {output}: already exists; remove it or choose another --output"
    )
    assert [p.name for p in output.iterdir()] == ["keep.txt"]


def test_a_run_directory_exports_its_newest_checkpoint_and_step_n_may_be_unpadded(drope_run, tmp_path, capsys):
    run_dir = drope_run.parent
    assert main(["--checkpoint", str(run_dir), "--output", str(tmp_path / "newest")]) == 0
    assert f"exported step 2 of {drope_run / STEP}" in capsys.readouterr().out
    assert main(["--checkpoint", str(drope_run / "step_1"), "--output", str(tmp_path / "first")]) == 0
    assert f"exported step 1 of {drope_run / 'step_00000001'}" in capsys.readouterr().out
    # A step the run does not have is still refused, naming what was given.
    assert main(["--checkpoint", str(drope_run / "step_3"), "--output", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.startswith(f"nopetrain-export: error: {drope_run / 'step_3'}: neither")
