"""Experiments end to end: synthetic look-up documents, the experiment config, and a two-arm experiment that trains
and evaluates with `python -m nopetrain.experiment` on a small real corpus."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from nopetrain.config import ConfigError
from nopetrain.data.streaming import read_documents
from nopetrain.data_pipelines.corpus_lookup import build_lookup, lookup_document
from nopetrain.data_pipelines.encoders import describe, load
from nopetrain.eval.config import NIAH_TASKS
from nopetrain.experiment import load_config

from .helpers import REPO, subprocess_env

SEQ_LEN = 256


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small default corpus at SEQ_LEN (long enough for four needles and a question) with 40 look-up documents."""
    output = tmp_path_factory.mktemp("corpus")
    cmd = [sys.executable, "-m", "nopetrain.data_pipelines", "build-default", "--output", str(output)]
    cmd += ["--seq-len", str(SEQ_LEN), "--vocab-size", "1024", "--max-mb-per-source", "0.25", "--workers", "1"]
    subprocess.run(cmd, cwd=REPO, env=subprocess_env(), check=True, capture_output=True, timeout=300)
    build_lookup(output, 40)
    return output


def test_lookup_documents_fit_one_sample_and_end_with_their_answer(corpus: Path) -> None:
    encoder = load(describe(str(corpus / "tokenizer.model")))
    rng = random.Random(0)
    filler = "The quick brown fox jumps over the lazy dog near the river bank. " * 400
    for task in NIAH_TASKS:
        for _ in range(5):
            text = lookup_document(rng, task, filler, encoder, SEQ_LEN + 1)
            assert len(encoder.encode([text])[0]) + 1 <= SEQ_LEN + 1
            lines = text.splitlines()
            needles = [line for line in lines if line.startswith("key: ")]
            assert len(needles) == (1 if task == "standard" else 4)
            answer = lines[-1].removeprefix("Answer: ").split(", ")
            assert all(any(line.endswith(f"value: {value}") for line in needles) for value in answer)
            assert lines[-2].startswith("Question: ")


def test_build_lookup_writes_a_source_of_whole_documents(corpus: Path) -> None:
    documents, tokenizer = read_documents(str(corpus / "train" / "lookup"), 1024)
    raw = (corpus / "raw" / "train" / "lookup.jsonl").read_text().splitlines()
    assert (
        len(raw) == 40
        and tokenizer["sha256"] == json.loads((corpus / "corpus.json").read_text())["tokenizer"]["sha256"]
    )
    # Every document, EOS included, fits one training sample (the stream's cut-off last one may be shorter).
    assert all(len(document) <= SEQ_LEN + 1 for document in documents)


def test_experiment_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no_such_key"):
        load_config("drope_tiny", ["no_such_key=1"])
    with pytest.raises(ConfigError, match="known: drope_tiny"):
        load_config("no_such_experiment", [])
    with pytest.raises(ConfigError, match=r"niah\.trials"):
        load_config("drope_tiny", ["eval.niah.trials=0"])


@pytest.mark.slow
def test_two_arm_experiment_trains_and_evaluates(tmp_path: Path, corpus: Path) -> None:
    config = tmp_path / "two_arms.yaml"
    config.write_text(
        f"""
name: two_arms
out: {tmp_path}/out
corpus: {{path: {corpus}, seq_len: {SEQ_LEN}}}
parallel: 2
train:
  - data=default_lookup
  - model.vocab_size=1024
  - seq_len={SEQ_LEN}
  - steps=6
  - precision=fp32
  - log_every=3
  - data.sources.web.path=${{corpus.path}}/train/web
  - data.sources.code.path=${{corpus.path}}/train/code
  - data.sources.math.path=${{corpus.path}}/train/math
  - data.sources.lookup.path=${{corpus.path}}/train/lookup
arms:
  rope: {{overrides: [model.no_rope_layer_interval=0]}}
  drope: {{overrides: [model.no_rope_layer_interval=0, curriculum=drope]}}
eval:
  heldout: ["${{corpus.path}}/heldout/web", "${{corpus.path}}/heldout/code"]
  factors: [1, 2]
  rope_scaling: {{methods: [pi, yarn]}}
  perplexity: {{documents: 2}}
  logit_scale: {{documents: 2}}
  niah: {{trials: 2, tasks: [standard, multi_key], depths: [0.5], max_new_tokens: 8}}
"""
    )
    cmd = [sys.executable, "-m", "nopetrain.experiment", str(config)]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    for arm in ("rope", "drope"):
        state = json.loads(
            sorted((out / "arms" / arm / "checkpoints").glob("step_*"))[-1].joinpath("trainer_state.json").read_text()
        )
        assert state["step"] == 6
    assert (
        json.loads(
            (sorted((out / "arms" / "drope" / "checkpoints").glob("step_*"))[-1] / "trainer_state.json").read_text()
        )["drope_step"]
        is not None
    )
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    methods = {(row["model"], row["method"]) for row in rows}
    assert {("rope", "none"), ("rope", "pi"), ("rope", "yarn"), ("drope", "none"), ("drope", "logit_scale")} <= methods
    assert "rope" in (out / "results.md").read_text()
