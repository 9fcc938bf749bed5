"""`nopetrain-eval` end to end on tiny checkpoints trained on the small real corpus: a RoPE model (with
the scaling baselines) and the same run after DroPE (with the fitted logit scale), side by side in one report."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nopetrain.data.shards import read_documents
from nopetrain.data_pipelines.encoders import describe, load
from nopetrain.data_pipelines.lookup_text import needle_task
from nopetrain.eval import niah
from nopetrain.eval.config import (
    EvalConfig,
    LogitScaleConfig,
    NiahConfig,
    PairedConfig,
    PerplexityConfig,
    ReportConfig,
    RopeScalingConfig,
)
from nopetrain.eval.evaluate import evaluate
from nopetrain.eval.report import write_report

from ..helpers import REPO, copy_run, corpus_overrides, run_train, subprocess_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus) -> Path:
    """Four steps at seq_len 64: RoPE (RRRN) at step 2, every layer NoPE after the DroPE switch at step 3; held-out
    perplexity evaluated every 2 steps."""
    run_dir = tmp_path_factory.mktemp("run")
    overrides = ("steps=4", "checkpoint.every=2", "checkpoint.keep=4", "curriculum.drope.at_step=3")
    evaluation = ("eval.every=2", f"eval.source={corpus}/heldout/web", "eval.factors=[1,2]", "eval.documents=2")
    run_train(run_dir, *corpus_overrides(corpus), *overrides, *evaluation)
    return run_dir


def test_training_logs_heldout_perplexity_every_n_steps(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = {row["step"]: (row["eval/ppl_1x"], row["eval/ppl_2x"]) for row in rows if "eval/ppl_1x" in row}
    assert sorted(evaluated) == [2, 4]
    assert all(1.0 < ppl < 1024 for pair in evaluated.values() for ppl in pair)
    assert evaluated[2] != evaluated[4]


def heldout(corpus: Path) -> str:
    return "[" + ",".join(f"{corpus}/heldout/{name}" for name in ("web", "code", "math")) + "]"


def eval_command(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "nopetrain.eval", *overrides]


def test_cli_writes_table_csv_plots_and_fits_the_logit_scale(run_dir, corpus, tmp_path):
    rope, drope = run_dir / "checkpoints" / "step_00000002", run_dir / "checkpoints" / "step_00000004"
    out = tmp_path / "report"
    overrides = [
        f"+models.rope={rope}",
        f"+models.drope={run_dir}",  # a run directory means its newest checkpoint
        f"out={out}",
        f"heldout={heldout(corpus)}",
        "factors=[1,2]",
        "perplexity.documents=2",
        "niah.trials=2",
        "niah.tasks=[standard,multi_key]",
        "niah.depths=[0.0,1.0]",
        "niah.max_new_tokens=8",
        "rope_scaling.methods=[pi,yarn]",
        "logit_scale.tolerance=0.1",
        "logit_scale.documents=2",
        "report.gate.model=rope",
        "report.paired=[{a: drope/logit_scale, b: rope/yarn, tasks: [standard], factors: [2]}]",
    ]
    proc = subprocess.run(
        eval_command(*overrides), cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "niah_by_depth.png",
        "niah_by_length.png",
        "ppl_by_position.png",
        "ppl_vs_length.png",
        "results.csv",
        "results.md",
        "trials.csv",
    ]
    assert any((out / "wandb").glob("offline-run-*"))
    rows = list(csv.DictReader((out / "results.csv").open()))
    methods = {(row["model"], row["method"]) for row in rows}
    assert methods == {("rope", "none"), ("rope", "pi"), ("rope", "yarn"), ("drope", "none"), ("drope", "logit_scale")}
    ppl = {(r["model"], r["method"], r["context_len"]): float(r["value"]) for r in rows if r["metric"] == "ppl"}
    assert set(ppl) == {(model, method, length) for model, method in methods for length in ("64", "128")}
    # Every length is scored on the same documents, and each cell says how many and how many tokens.
    support = {(r["model"], r["method"], r["context_len"], r["n"], r["tokens"]) for r in rows if r["metric"] == "ppl"}
    assert support == {(model, method, length, "2", str(2 * int(length))) for model, method, length in ppl}
    # At the training context every scaling is the identity; beyond it, they change the model.
    assert ppl[("rope", "pi", "64")] == pytest.approx(ppl[("rope", "none", "64")], rel=1e-5)
    assert ppl[("rope", "yarn", "128")] != ppl[("rope", "none", "128")]
    # Four needles do not fit 64 tokens: multi_key appears at 128 only (and the log says why).
    niah_rows = [r for r in rows if r["metric"] == "niah" and not r["depth"]]
    assert {(r["task"], r["context_len"]) for r in niah_rows if r["model"] == "rope" and r["method"] == "none"} == {
        ("standard", "64"),
        ("standard", "128"),
        ("multi_key", "128"),
    }
    assert "NIAH multi_key at 64 tokens skipped" in proc.stderr
    # Each rate with its Wilson interval (greedy scores of one value are 0 or 1), each perplexity with its bootstrap.
    for r in niah_rows:
        assert float(r["ci_low"]) <= float(r["value"]) <= float(r["ci_high"]) and r["interval"] == "wilson"
        assert (r["n"], r["scoring"], int(r["successes"])) == ("2", "greedy", round(2 * float(r["value"])))
    assert all(
        float(r["ci_low"]) <= ppl[(r["model"], r["method"], r["context_len"])] <= float(r["ci_high"])
        for r in rows
        if r["metric"] == "ppl"
    )

    # The trials are built once per task and length and scored by every model and method: the same prompts.
    assert len([line for line in proc.stderr.splitlines() if " trials built in " in line]) == 3
    trials = list(csv.DictReader((out / "trials.csv").open()))
    assert len(trials) == len(methods) * 3 * 2
    prompts = {(t["task"], t["context_len"], t["trial"], t["depth"], t["prompt_sha256"]) for t in trials}
    assert len(prompts) == 3 * 2 and {t["value"] for t in trials} <= {"0.0", "1.0"}
    by_cell = {(r["model"], r["method"], r["task"], r["context_len"]): float(r["value"]) for r in niah_rows}
    for key, value in by_cell.items():
        scores = [float(t["value"]) for t in trials if (t["model"], t["method"], t["task"], t["context_len"]) == key]
        assert sum(scores) / len(scores) == value

    table = (out / "results.md").read_text()
    # Four training steps do not learn retrieval: the report opens by saying so.
    assert table.splitlines()[2] == (
        "**Underpowered: retrieval not learned in context.** rope standard NIAH at 1x: 0.0% [0.0, 65.8] (n=2) < 80% "
        "gate; the comparisons beyond the context below carry no information about length generalisation."
    )
    assert "## NIAH standard (success %, greedy decoding, n=2 trials per cell, 95% Wilson interval)" in table
    assert "| rope | none | 0.0 [0.0, 65.8] |" in table
    assert "## Paired comparison (McNemar, same prompts)" in table
    assert "| drope/logit_scale | rope/yarn | standard | 2x | 2 |" in table
    assert "## Perplexity" in table and "| drope | logit_scale |" in table and "## NIAH multi_key" in table
    assert "- rope: 2 documents at every length; tokens 128 (1x) / 256 (2x)" in table
    assert "## Logit scale" in table and "| web: 2 documents, 256 tokens |" in table

    # The fit is stored beside the DroPE checkpoint, within the search range (negative values included), with what
    # it was fitted on: held-out prose (web's documents 0, 2, 4, ...; the report scores 1, 3, 5, ...).
    fitted = json.loads((drope / "logit_scale.json").read_text())
    assert (fitted["low"], fitted["high"]) == (-0.4, 2.0) and -0.4 <= fitted["coef"] <= 2.0
    assert fitted["documents"] == [{"source": f"{corpus}/heldout/web", "documents": 2, "tokens": 256}]
    assert fitted["boundary"] in (None, "low", "high") and fitted["train_context"] == 64 and fitted["lengths"] == [128]
    fit_log = next(line for line in proc.stderr.splitlines() if "fitted logit scale" in line)
    assert f"c={fitted['coef']:.4f} in [-0.4, 2]" in fit_log and "on web: 2 documents, 256 tokens" in fit_log
    (fit_row,) = [r for r in rows if r["metric"] == "logit_scale_c"]
    assert (fit_row["model"], fit_row["source"], fit_row["n"], fit_row["tokens"]) == ("drope", "web", "2", "256")
    assert fitted["ppl"][0] <= fitted["ppl_unscaled"][0] + 1e-9
    assert not (rope / "logit_scale.json").exists()

    # The Python API: same rows for the same config, and the stored c is reused rather than fitted again.
    stamp = (drope / "logit_scale.json").stat().st_mtime_ns
    cfg = EvalConfig(
        checkpoint=str(drope),
        out=str(tmp_path / "api"),
        heldout=heldout(corpus)[1:-1].split(","),
        factors=[1, 2],
        perplexity=PerplexityConfig(documents=2),
        niah=NiahConfig(enabled=False),
        rope_scaling=RopeScalingConfig(),
    )
    api_rows = evaluate(cfg)
    assert (drope / "logit_scale.json").stat().st_mtime_ns == stamp
    api_ppl = {(r["method"], r["context_len"]): r["value"] for r in api_rows if r["metric"] == "ppl"}
    assert api_ppl[("logit_scale", 128)] == pytest.approx(ppl[("drope", "logit_scale", "128")], rel=1e-6)
    assert {r["model"] for r in api_rows} == {"step_00000004"}


def test_an_interrupted_evaluation_resumes_from_its_finished_units(run_dir, corpus, tmp_path, caplog):
    """An evaluation of rope alone, then of rope and drope into the same folder (what an evaluation killed after
    rope's units leaves) reuses rope's units and writes the files of one evaluation of both; a changed config
    computes the units again."""
    run = copy_run(run_dir, tmp_path)  # its own stored logit scale
    rope = str(run / "checkpoints" / "step_00000002")

    def config(out: Path, models: dict[str, str], trials: int = 2) -> EvalConfig:
        # What the report shows is no part of a unit: rope alone has no pair to compare.
        paired = [PairedConfig(a="drope/logit_scale", b="rope/yarn", factors=[2])] if "drope" in models else []
        return EvalConfig(
            models=models,
            out=str(out),
            heldout=heldout(corpus)[1:-1].split(","),
            factors=[1, 2],
            perplexity=PerplexityConfig(documents=2),
            niah=NiahConfig(trials=trials, tasks=["standard"], depths=[0.5], scoring="teacher_forced"),
            rope_scaling=RopeScalingConfig(methods=["yarn"]),
            logit_scale=LogitScaleConfig(tolerance=0.1, documents=2),
            report=ReportConfig(paired=paired),
        )

    both = {"rope": rope, "drope": str(run)}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    write_report(evaluate(config(straight, both)), straight)
    with caplog.at_level(logging.INFO, logger="nopetrain.eval"):
        evaluate(config(resumed, {"rope": rope}))
        assert sorted(p.name for p in (resumed / "partial" / "rope").iterdir()) == [
            "none_1x.json",
            "none_2x.json",
            "yarn_1x.json",
            "yarn_2x.json",
        ]
        caplog.clear()
        write_report(evaluate(config(resumed, both)), resumed)
    messages = [record.getMessage() for record in caplog.records]
    assert f"rope: 4 of 4 units reused from {resumed / 'partial'}" in messages
    computed = [message for message in messages if " units done, ~" in message]
    assert [message.split(" (")[0] for message in computed] == [
        "drope none 1x",
        "drope none 2x",
        "drope logit_scale 1x",
        "drope logit_scale 2x",
    ]
    assert re.search(r"; 8/8 units done, ~\d+\.\d min left$", computed[-1])
    for name in ("results.csv", "trials.csv", "results.md"):
        assert (resumed / name).read_text() == (straight / name).read_text(), name

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nopetrain.eval"):
        evaluate(config(resumed, {"rope": rope}, trials=3))
    assert (
        f"rope: 0 of 4 units reused from {resumed / 'partial'}; 4 there were computed with another config or "
        "checkpoint and are computed again"
    ) in [record.getMessage() for record in caplog.records]
    unit = json.loads((resumed / "partial" / "rope" / "none_1x.json").read_text())
    checksums = hashlib.sha256((Path(rope) / "checksums.json").read_bytes()).hexdigest()
    identity = {"checkpoint": rope, "step": 2, "checksums_sha256": checksums, "train_context": 64}
    assert unit["model_identity"] == identity
    assert {row["n"] for row in unit["rows"] if row["metric"] == "niah"} == {3}
    # Another training context puts every unit at other lengths: none is reused.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nopetrain.eval"):
        evaluate(dataclasses.replace(config(resumed, {"rope": rope}, trials=3), train_context=32))
    assert any(m.startswith("rope: 0 of 4 units reused") for m in [r.getMessage() for r in caplog.records])


def test_a_copying_model_scores_100_percent_through_the_real_tokenizer(corpus):
    tokenizer = load(describe(str(corpus / "tokenizer.model")))
    for seed in range(20):
        for task in ("standard", "multi_key", "multi_query", "multi_value"):
            text = needle_task(random.Random(seed), task, 4)
            copied = tokenizer.decode(tokenizer.encode([" " + text.answer_text + "\n"])[0])
            assert niah.score(copied, text.answers) == 1.0
            assert niah.score(copied.replace(text.answers[0], "0000000"), text.answers) < 1.0


def test_heldout_documents_are_the_raw_documents(corpus):
    """read_documents undoes the packing: each document decodes to its raw text and ends with EOS; the last one is
    the start of a document (the packer drops the stream's remainder)."""
    info = describe(str(corpus / "tokenizer.model"))
    tokenizer = load(info)
    for source in ("web", "math"):
        documents, record = read_documents(str(corpus / "heldout" / source), 1024)
        raw = [json.loads(line)["text"] for line in (corpus / "raw" / "heldout" / f"{source}.jsonl").open()]
        assert record["sha256"] == info.sha256 and len(documents) == len(raw) > 1
        for document, text in zip(documents[:-1], raw, strict=False):
            assert document[-1] == info.eos_id and tokenizer.decode(document[:-1].tolist()) == text
        assert raw[-1].startswith(tokenizer.decode(documents[-1].tolist()))


def test_bad_checkpoint_is_one_line_and_exit_2(tmp_path, corpus):
    missing = tmp_path / "nowhere"
    proc = subprocess.run(
        eval_command(f"checkpoint={missing}", f"out={tmp_path / 'out'}", f"heldout={heldout(corpus)}"),
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        f"nopetrain-eval: error: {missing}: neither a checkpoint nor a run directory with complete checkpoints"
    ]
    assert not (tmp_path / "out" / "results.csv").exists()


def test_a_local_hugging_face_folder_evaluates_like_the_checkpoint(run_dir, corpus, tmp_path):
    """The RoPE checkpoint exported to Hugging Face (plain SmolLM3 + tokenizer.json), with held-out shards tokenized
    by that tokenizer.json as a user would for any HF model, gives about the checkpoint's perplexity."""
    from nopetrain.data_pipelines.tokenize_source import tokenize
    from nopetrain.export import main as export_main

    checkpoint = run_dir / "checkpoints" / "step_00000002"
    folder = tmp_path / "hf"
    assert export_main(["--checkpoint", str(checkpoint), "--output", str(folder)]) == 0
    tokenize([str(corpus / "raw" / "heldout" / "web.jsonl")], str(folder / "tokenizer.json"), tmp_path, "web", 64)

    def ppl(spec: str, heldout: str) -> dict[int, float]:
        cfg = EvalConfig(
            checkpoint=spec,
            out=str(tmp_path / "out"),
            heldout=[heldout],
            factors=[1, 2],
            perplexity=PerplexityConfig(documents=2),
            niah=NiahConfig(tasks=["standard"], trials=1, max_new_tokens=4),
            rope_scaling=RopeScalingConfig(methods=[]),
        )
        rows = evaluate(cfg)
        assert {(r["metric"], r.get("task")) for r in rows} == {
            ("ppl", None),
            ("ppl_bucket", None),
            ("niah", "standard"),
            ("niah_trial", "standard"),
        }
        return {r["context_len"]: r["value"] for r in rows if r["metric"] == "ppl"}

    from_hf = ppl(f"hf:{folder}", str(tmp_path / "web"))
    ours = ppl(str(checkpoint), str(corpus / "heldout" / "web"))
    assert set(from_hf) == {64, 128}  # max_position_embeddings is the training context
    # Not equal: tokenizer.json breaks sentencepiece's exact score ties differently (see nopetrain/export.py), so
    # a few held-out tokens differ; the model is the same (logit parity is tested in test_export.py).
    for length, value in ours.items():
        assert from_hf[length] == pytest.approx(value, rel=0.05)
