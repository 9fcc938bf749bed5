"""Experiments end to end: synthetic look-up documents, the experiment config, and a two-arm experiment that trains
and evaluates with `nopetrain-experiment` on a small real corpus."""

from __future__ import annotations

import csv
import itertools
import json
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from nopetrain.config import ConfigError, TrainConfig, register_configs
from nopetrain.curriculum import Schedule, learning_rate, resolve
from nopetrain.data.shards import read_documents
from nopetrain.data_pipelines.corpus_lookup import build_lookup, lookup_document
from nopetrain.data_pipelines.encoders import Encoder, describe, load
from nopetrain.data_pipelines.errors import DataError
from nopetrain.data_pipelines.lookup_text import NIAH_TASKS, NeedleTask, needle_task
from nopetrain.eval import niah
from nopetrain.eval.config import EvalConfig, NiahConfig
from nopetrain.eval.evaluate import niah_trials
from nopetrain.experiment import ArmConfig, ArmFailed, CorpusConfig, build_corpus, load_config

from .helpers import REPO, losses, subprocess_env

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


def line_ids(ids: list[int], decode, line: str) -> list[int]:
    """The ids of the newline-delimited piece of `ids` that decodes to `line`."""
    breaks = [-1, *(i for i, token in enumerate(ids) if decode([token]) == "\n"), len(ids)]
    pieces = [ids[a + 1 : b] for a, b in itertools.pairwise(breaks)]
    return next(piece for piece in pieces if decode(piece) == line)


def key_ids(ids: list[int], decode, key: str) -> list[int]:
    """The shortest run of `ids` that decodes to `key` (spaces aside)."""
    spans = [ids[a:b] for a in range(len(ids)) for b in range(a + 1, len(ids) + 1)]
    return min((span for span in spans if decode(span).strip() == key), key=len)


def training_and_prompts(corpus: Path, task: str) -> Iterator[tuple[Encoder, NeedleTask, list[int], list[int]]]:
    """For seeds 0-3: the encoder, a task's text, the ids of a training look-up document of it and of a 512-token
    evaluation prompt of it (the same needles, question and depths)."""
    encoder = load(describe(str(corpus / "tokenizer.model")))
    haystacks, _ = read_documents(str(corpus / "heldout" / "web"), 1024)
    filler = niah.haystack_for(haystacks, random.Random(1), 2000, encoder.decode)
    for seed in range(4):
        text = needle_task(random.Random(seed), task)
        training = encoder.encode([lookup_document(random.Random(seed), task, filler, encoder, SEQ_LEN + 1)])[0]
        haystack = niah.haystack_for(haystacks, random.Random(seed), 512, encoder.decode)
        depths = [random.Random(seed).random() for _ in text.needles]
        yield encoder, text, training, niah.build_prompt(text, haystack, depths, 512, encoder.encode)


@pytest.mark.parametrize("task", NIAH_TASKS)
def test_prompts_tokenize_needles_and_questions_as_training_does(corpus: Path, task: str) -> None:
    """A needle line and the question line get the same ids in an evaluation prompt as in a training look-up
    document; no space token is left before a newline; the key has the same ids in its needle and in the question."""
    for encoder, text, training, prompt in training_and_prompts(corpus, task):
        assert len(prompt) == 512
        question = text.question.split("\n")[0]
        for line in [*text.needles, question]:
            assert line_ids(prompt, encoder.decode, line) == line_ids(training, encoder.decode, line), line
        for ids in (prompt, training):
            assert not any(
                encoder.decode([a]).strip() == "" and encoder.decode([b]) == "\n" for a, b in itertools.pairwise(ids)
            )
        for needle in text.needles:
            key = needle.removeprefix("key: ").split(",")[0]
            if key in question:
                asked = key_ids(line_ids(prompt, encoder.decode, question), encoder.decode, key)
                assert key_ids(line_ids(prompt, encoder.decode, needle), encoder.decode, key) == asked, key


@pytest.mark.parametrize("task", NIAH_TASKS)
def test_teacher_forced_answers_continue_the_prompt_as_a_training_document(corpus: Path, task: str) -> None:
    """The answer ids that teacher forcing scores are those a training look-up document has after its question, and
    an evaluation prompt ends with the ids that precede them there: prompt + answer is the whole text's tokenization
    in training."""
    for encoder, text, training, prompt in training_and_prompts(corpus, task):
        answer = niah.answer_ids(encoder.encode, text.question, text.answer_text)
        assert encoder.decode(answer).strip() == text.answer_text
        assert niah.ends_like_question(prompt, text.question, encoder.encode, encoder.decode)
        question = line_ids(prompt, encoder.decode, text.question.split("\n")[0])
        start = max(i for i in range(len(prompt)) if prompt[i : i + len(question)] == question)
        assert [*prompt[start:], *answer] == training[-(len(prompt) - start + len(answer)) :]


@pytest.mark.parametrize("task", NIAH_TASKS)
def test_at_1x_every_answer_position_is_inside_the_training_context(corpus: Path, task: str) -> None:
    """A 1x trial's prompt and answer together fit SEQ_LEN: teacher forcing (and greedy decoding of the answer) read
    the answer at positions below the training context, where training saw every position."""
    encoder = load(describe(str(corpus / "tokenizer.model")))
    haystacks, _ = read_documents(str(corpus / "heldout" / "web"), 1024)
    trials = niah_trials(encoder, haystacks, task, SEQ_LEN, EvalConfig(niah=NiahConfig(trials=10)))
    for trial in trials:
        # The answer's tokens sit at positions len(prompt) ... len(prompt) + len(answer) - 1.
        assert len(trial.prompt) + len(trial.answer) - 1 < SEQ_LEN
        assert len(trial.prompt) + len(trial.answer) == SEQ_LEN


@pytest.mark.parametrize("task", NIAH_TASKS)
def test_a_trials_needle_span_starts_at_its_farthest_asked_needle(corpus: Path, task: str) -> None:
    """needle_span counts the tokens from the first of the farthest needle that holds an asked value to the answer's
    last: the tokens from there on hold every asked needle, one token fewer does not; at 2x, a needle at depth 0
    lies beyond the training context and one at depth 1 within it."""
    encoder = load(describe(str(corpus / "tokenizer.model")))
    haystacks, _ = read_documents(str(corpus / "heldout" / "web"), 1024)
    length = 2 * SEQ_LEN
    trials = niah_trials(encoder, haystacks, task, length, EvalConfig(niah=NiahConfig(trials=10)))
    for trial in trials:
        start = length - trial.needle_span
        asked = [trial.text.needles[i] for i in trial.text.asked]
        assert all(needle in encoder.decode(trial.prompt[start:].tolist()) for needle in asked)
        assert not all(needle in encoder.decode(trial.prompt[start + 1 :].tolist()) for needle in asked)
    if task == "standard":
        assert all(trial.needle_span > SEQ_LEN for trial in trials if trial.depth == 0.0)
        assert all(trial.needle_span < SEQ_LEN for trial in trials if trial.depth == 1.0)


def test_build_lookup_writes_a_source_of_whole_documents(corpus: Path) -> None:
    documents, tokenizer = read_documents(str(corpus / "train" / "lookup"), 1024)
    raw = (corpus / "raw" / "train" / "lookup.jsonl").read_text().splitlines()
    assert (
        len(raw) == 40
        and tokenizer["sha256"] == json.loads((corpus / "corpus.json").read_text())["tokenizer"]["sha256"]
    )
    # Every document, EOS included, fits one training sample (the stream's cut-off last one may be shorter).
    assert all(len(document) <= SEQ_LEN + 1 for document in documents)


def composed_arms(name: str) -> Iterator[tuple[str, ArmConfig, TrainConfig, Schedule]]:
    """Each arm of experiment `name`: its spec, its composed train.py config and that config's resolved schedule."""
    register_configs()
    experiment = load_config(name, [])
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        for arm, spec in experiment.arms.items():
            cfg = OmegaConf.to_object(compose("train", overrides=[*experiment.train, *spec.overrides]))
            yield arm, spec, cfg, resolve(cfg, world_size=1)


def test_drope_tiny_recalibrates_in_the_papers_proportions() -> None:
    """The DroPE arm drops RoPE at 87.5% of the steps and recalibrates at 3.3x the pretraining peak (1e-3 against
    3e-4) with 3.5% warmup (70 of 2K steps); every arm ends at the same learning rate."""
    final = {}
    for arm, spec, cfg, schedule in composed_arms("drope_tiny"):
        final[arm] = learning_rate(schedule, cfg, schedule.total_steps)  # where each schedule ends
        if arm == "drope":
            # It trains only its recalibration, from the RoPE arm's checkpoint at the drop.
            assert (spec.from_arm, spec.from_step) == ("rope", schedule.drope_step)
            recalibration = schedule.total_steps - schedule.drope_step
            assert recalibration == pytest.approx(0.125 * schedule.total_steps, abs=1)
            assert cfg.curriculum.drope.lr / cfg.optim.lr == pytest.approx(1e-3 / 3e-4, rel=0.02)
            assert schedule.drope_warmup == pytest.approx(70 / 2000 * recalibration, abs=1)
    assert len(set(final.values())) == 1, final


@pytest.mark.parametrize("name", sorted(path.stem for path in (REPO / "configs" / "experiment").glob("*.yaml")))
def test_every_profile_composes_and_its_drope_arms_start_at_their_drop(name: str) -> None:
    """Each committed profile loads on its schema, every arm's train.py config composes and resolves, and an arm
    that starts from another's checkpoint starts at its own drop: train.py would refuse any other step, hours into
    a run."""
    for arm, spec, _, schedule in composed_arms(name):
        if spec.from_arm is not None:
            assert schedule.drope_step == spec.from_step, (arm, schedule.drope_step, spec.from_step)


def test_build_lookup_draws_only_the_tasks_asked_for(corpus: Path, tmp_path: Path) -> None:
    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    build_lookup(copy, 30, seed=1, tasks=["standard"], value_digits=3)
    texts = [json.loads(line)["text"] for line in (copy / "raw" / "train" / "lookup.jsonl").read_text().splitlines()]
    assert len(texts) == 30 and all(text.count("\nkey: ") == 1 for text in texts)
    # Three-digit values, in the needle and in the answer alike.
    assert all(re.search(r"value: \d{3}\n", text) and re.search(r"\nAnswer: \d{3}$", text) for text in texts)
    assert json.loads((copy / "corpus.json").read_text())["lookup"] == {
        "documents": 30,
        "tasks": ["standard"],
        "seed": 1,
        "value_digits": 3,
    }
    with pytest.raises(DataError, match="--tasks has 'no_task'"):
        build_lookup(copy, 30, tasks=["no_task"])
    with pytest.raises(DataError, match="--value-digits=0"):
        build_lookup(copy, 30, value_digits=0)


def test_short_lookups_are_a_source_of_their_own_packed_at_their_length(corpus: Path, tmp_path: Path) -> None:
    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    manifest = build_lookup(copy, 20, seq_len=160, name="lookup_short")
    assert manifest["seq_len"] == 160 and (copy / "train" / "lookup_short" / "manifest.json").is_file()
    summary = json.loads((copy / "corpus.json").read_text())
    assert summary["lookup_short"]["seq_len"] == 160 and summary["lookup"]["documents"] == 40  # the fixture's stays
    encoder = load(describe(str(copy / "tokenizer.model")))
    texts = [
        json.loads(line)["text"] for line in (copy / "raw" / "train" / "lookup_short.jsonl").read_text().splitlines()
    ]
    assert all(len(encoder.encode([text])[0]) + 1 <= 161 for text in texts)
    # The experiment's corpus check knows the source by its settings.
    build_corpus(
        CorpusConfig(
            path=str(copy),
            seq_len=SEQ_LEN,
            vocab_size=1024,
            lookup_documents=40,
            lookup_tasks=list(NIAH_TASKS),
            short_lookup_documents=20,
            short_seq_len=160,
            value_digits=7,
        )
    )


def test_an_experiment_refuses_a_corpus_built_otherwise(corpus: Path) -> None:
    # The fixture's corpus: seq_len 256, vocabulary 1024, 40 look-ups of every task.
    with pytest.raises(ConfigError, match=r"corpus\.seq_len=128 but .*corpus\.json was built with 256"):
        build_corpus(CorpusConfig(path=str(corpus), seq_len=128, vocab_size=1024))
    with pytest.raises(
        ConfigError, match=r"corpus\.lookup_documents/lookup_tasks/value_digits ask for .*'documents': 41"
    ):
        build_corpus(CorpusConfig(path=str(corpus), seq_len=SEQ_LEN, vocab_size=1024, lookup_documents=41))
    with pytest.raises(ConfigError, match=r"value_digits ask for .*'value_digits': 3"):
        build_corpus(
            CorpusConfig(path=str(corpus), seq_len=SEQ_LEN, vocab_size=1024, lookup_documents=40, value_digits=3)
        )
    build_corpus(CorpusConfig(path=str(corpus), seq_len=SEQ_LEN, vocab_size=1024, lookup_documents=40))


@pytest.mark.parametrize(
    ("arm_exit_codes", "exit_code"), [([2], 2), ([2, 2], 2), ([1], 1), ([2, 1], 1), ([-9], 1), ([], 1)]
)
def test_an_experiment_is_refused_only_when_its_failed_arms_were_refused(arm_exit_codes, exit_code) -> None:
    assert ArmFailed("experiment x: training failed", arm_exit_codes).exit_code == exit_code


def test_experiment_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no_such_key"):
        load_config("drope_tiny", ["no_such_key=1"])
    with pytest.raises(ConfigError, match=r"known: .*drope_tiny"):
        load_config("no_such_experiment", [])
    with pytest.raises(ConfigError, match=r"niah\.trials"):
        load_config("drope_tiny", ["eval.niah.trials=0"])
    with pytest.raises(ConfigError, match=r"eval\.niah\.value_digits=7 but .* corpus\.value_digits=3"):
        load_config("drope_tiny", ["corpus.value_digits=3"])
    with pytest.raises(ConfigError, match=r"arms\.drope\.from_arm='rop' must name another arm"):
        load_config("drope_tiny", ["arms.drope.from_arm=rop"])
    with pytest.raises(ConfigError, match=r"arms\.drope: set from_arm and from_step together"):
        load_config("drope_tiny", ["arms.drope.from_step=null"])


@pytest.mark.slow
def test_two_arm_experiment_trains_and_evaluates(tmp_path: Path, corpus: Path) -> None:
    config = tmp_path / "two_arms.yaml"
    config.write_text(
        f"""
name: two_arms
out: {tmp_path}/out
corpus: {{path: {corpus}, seq_len: {SEQ_LEN}, vocab_size: 1024}}
parallel: 2
train:
  - data=default_lookup
  - model.vocab_size=1024
  - seq_len={SEQ_LEN}
  - steps=8
  - precision=fp32
  - log_every=3
  - data.root=${{corpus.path}}
arms:
  rope: {{overrides: [model.no_rope_layer_interval=0]}}
  drope:
    overrides: [model.no_rope_layer_interval=0, curriculum=drope]
    from_arm: rope
    from_step: 7
eval:
  heldout: ["${{corpus.path}}/heldout/web", "${{corpus.path}}/heldout/code"]
  factors: [1, 2]
  rope_scaling: {{methods: [pi, yarn]}}
  perplexity: {{documents: 2}}
  logit_scale: {{documents: 2}}
  niah:
    trials: 2
    tasks: [standard, multi_key]
    depths: [0.5]
    max_new_tokens: 8
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
        assert state["step"] == 8
    assert state["drope_step"] == 7
    # The DroPE arm trained only its recalibration, from the checkpoint the RoPE arm kept at the drop for it.
    assert sorted(losses(out / "arms" / "rope")) == [3, 6, 8] and sorted(losses(out / "arms" / "drope")) == [8]
    assert (out / "arms" / "rope" / "checkpoints" / "step_00000007").is_dir()
    assert "training arm drope from arm rope at step 7" in proc.stdout
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    methods = {(row["model"], row["method"]) for row in rows}
    assert {("rope", "none"), ("rope", "pi"), ("rope", "yarn"), ("drope", "none"), ("drope", "logit_scale")} <= methods
    report = (out / "results.md").read_text()
    assert "rope" in report and "## Protocol" in report and f"- command: `nopetrain-experiment {config}`" in report
