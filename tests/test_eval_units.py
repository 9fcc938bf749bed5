"""Evaluation building blocks without a trained model: RoPE-scaling frequencies against hand-computed values, the
scaled model itself, the logit scale, the NIAH generator and scorer, the fit of c, the report."""

from __future__ import annotations

import logging
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nopetrain.config import ConfigError, ModelConfig, validate_model
from nopetrain.eval import logit_scale, models, niah, partial
from nopetrain.eval.config import (
    NIAH_TASKS,
    EvalConfig,
    GateConfig,
    LogitScaleConfig,
    NiahConfig,
    PairedConfig,
    PerplexityConfig,
    ReportConfig,
    RopeScalingConfig,
    validate,
)
from nopetrain.eval.evaluate import check_report_methods, rate, scored_documents, split_heldout
from nopetrain.eval.models import LoadedModel
from nopetrain.eval.partial import Progress, Unit, UnitStore, fingerprint
from nopetrain.eval.perplexity import perplexity, same_documents
from nopetrain.eval.report import COLUMNS, TRIAL_COLUMNS, TRIAL_METRIC, markdown, series_styles, write_report
from nopetrain.eval.rope_scaling import RopeScaling, frequency_factors, inverse_frequencies, logit_factor
from nopetrain.eval.stats import bootstrap_mean, mcnemar, wilson
from nopetrain.model import Transformer

from .helpers import REPO

# head_dim 8, theta 10^4: the base frequencies are 1, 0.1, 0.01, 0.001.
HEAD_DIM, THETA, CONTEXT = 8, 10_000.0, 64
BASE = [1.0, 0.1, 0.01, 0.001]


def factors(method: str, s: float, seq_len: int = CONTEXT, **options) -> list[float]:
    return frequency_factors(RopeScaling(method, CONTEXT, s, **options), HEAD_DIM, THETA, seq_len).tolist()


@pytest.mark.parametrize("s", [2, 4])
def test_pi_divides_every_frequency_by_s(s):
    assert factors("pi", s) == pytest.approx([1 / s] * 4)


def test_ntk_scales_frequency_m_by_s_to_the_minus_2m_over_d_minus_2():
    # d - 2 = 6: gamma_m = s^(-m/3).
    assert factors("ntk", 2) == pytest.approx([1.0, 0.7937005, 0.6299605, 0.5], rel=1e-6)
    assert factors("ntk", 4) == pytest.approx([1.0, 0.6299605, 0.3968503, 0.25], rel=1e-6)
    # The same as raising the base to theta * s^(d/(d-2)).
    ntk_base = inverse_frequencies(HEAD_DIM, THETA * 2 ** (8 / 6), None, CONTEXT)
    scaled = inverse_frequencies(HEAD_DIM, THETA, RopeScaling("ntk", CONTEXT, 2.0), CONTEXT)
    torch.testing.assert_close(scaled, ntk_base, rtol=1e-6, atol=0)


def test_yarn_ramps_over_the_dimension_index_by_default():
    # The index whose frequency makes r rotations over 64 tokens: m(r) = 8 ln(64 / (2 pi r)) / (2 ln 10^4), so
    # m(q = 32) = -0.497 -> floor, clamped to 0, and m(p = 1) = 1.008 -> ceil 2: kappa = 1 - m / 2 = 1, 0.5, 0, 0.
    assert factors("yarn", 2) == pytest.approx([1.0, 0.75, 0.5, 0.5], rel=1e-6)
    assert factors("yarn", 4) == pytest.approx([1.0, 0.625, 0.25, 0.25], rel=1e-6)
    with pytest.raises(ValueError, match="yarn_ramp 'index' must be one of"):
        RopeScaling("yarn", CONTEXT, 2.0, yarn_ramp="index")


@pytest.mark.parametrize(
    ("head_dim", "theta", "context", "s", "beta_slow", "beta_fast"),
    [
        (64, 10_000.0, 256, 2.0, 1.0, 32.0),
        (64, 10_000.0, 256, 8.0, 1.0, 32.0),
        (128, 500_000.0, 4096, 4.0, 1.0, 32.0),
        (64, 100_000.0, 2048, 16.0, 2.0, 16.0),
    ],
)
def test_yarn_equals_transformers(head_dim, theta, context, s, beta_slow, beta_fast):
    """Our YaRN frequencies and temperature against transformers' own for the same config."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    parameters = {"rope_type": "yarn", "rope_theta": theta, "factor": s, "original_max_position_embeddings": context}
    hf_config = LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=int(s * context),
        rope_parameters={**parameters, "beta_fast": beta_fast, "beta_slow": beta_slow},
    )
    theirs, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, torch.device("cpu"))
    scaling = RopeScaling("yarn", context, s, alpha=beta_slow, beta=beta_fast)
    torch.testing.assert_close(inverse_frequencies(head_dim, theta, scaling, context), theirs, rtol=1e-6, atol=0)
    # transformers multiplies cos and sin by the attention factor, i.e. the logits by its square.
    assert logit_factor(scaling, context) == pytest.approx(attention_factor**2, rel=1e-12)
    # The paper's equation form stays available and is a different interpolation.
    equation = RopeScaling("yarn", context, s, alpha=beta_slow, beta=beta_fast, yarn_ramp="rotations")
    assert (inverse_frequencies(head_dim, theta, equation, context) - theirs).abs().max() > 1e-4 * theirs.max()


def test_yarn_equation_form_interpolates_by_rotations_over_the_training_context():
    # Rotations over 64 tokens: 64 w / 2 pi = 10.186, 1.0186, 0.10186, 0.010186; with p = 1, q = 32 the ramp is
    # kappa = (r - 1) / 31 = 0.296320, 0.000600, then 0 (clamped), and gamma = (1 - kappa) / s + kappa.
    rotations = {"yarn_ramp": "rotations"}
    assert factors("yarn", 2, **rotations) == pytest.approx([0.6481599, 0.5002999, 0.5, 0.5], rel=1e-5)
    assert factors("yarn", 4, **rotations) == pytest.approx([0.4722399, 0.2504498, 0.25, 0.25], rel=1e-5)
    # The temperature: logits times (0.1 ln s + 1)^2.
    assert logit_factor(RopeScaling("yarn", CONTEXT, 2.0), CONTEXT) == pytest.approx(1.0693147**2, rel=1e-6)
    assert logit_factor(RopeScaling("yarn", CONTEXT, 4.0), CONTEXT) == pytest.approx(1.1386294**2, rel=1e-6)
    assert logit_factor(RopeScaling("ntk", CONTEXT, 4.0), CONTEXT) == 1.0
    # A wider ramp keeps more frequencies interpolated: p = 0, q = 128 gives kappa_0 = 10.186 / 128.
    wide = RopeScaling("yarn", CONTEXT, 2.0, alpha=0.0, beta=128.0, yarn_ramp="rotations")
    assert frequency_factors(wide, HEAD_DIM, THETA, CONTEXT)[0].item() == pytest.approx(0.5 + 10.185916 / 256)


def test_dynamic_ntk_follows_the_input_length_and_every_method_is_the_identity_at_s_1():
    dynamic = RopeScaling("dynamic_ntk", CONTEXT)
    assert frequency_factors(dynamic, HEAD_DIM, THETA, 4 * CONTEXT).tolist() == pytest.approx(factors("ntk", 4))
    assert frequency_factors(dynamic, HEAD_DIM, THETA, CONTEXT // 2).tolist() == [1.0] * 4
    for method in ("pi", "ntk", "yarn"):
        assert factors(method, 1) == pytest.approx([1.0] * 4)
    assert inverse_frequencies(HEAD_DIM, THETA, None, CONTEXT).tolist() == pytest.approx(BASE)


def tiny_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return Transformer(cfg).eval()


def test_position_interpolation_in_the_model_equals_halved_positions():
    model = tiny_model()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16)[None]
    with torch.no_grad():
        plain = model(ids, positions)
        model.rope_scaling = RopeScaling("pi", 8, 2.0)
        interpolated = model(ids, 2 * positions)
        model.rope_scaling = None
        far = model(ids, 2 * positions)
    torch.testing.assert_close(interpolated, plain, atol=1e-5, rtol=1e-5)
    assert (far - plain).abs().max() > 1e-3


def test_yarn_temperature_acts_on_the_rope_layers_only():
    """A mixed model under YaRN equals the same model with no temperature whose RoPE layers' q projections are
    scaled by the temperature instead (RoPE is linear, and there is no QK-norm): the NoPE layers keep their logits."""
    model = tiny_model(num_layers=4, no_rope_layers=[0, 1, 0, 1])
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    scaling = RopeScaling("yarn", 8, 4.0)
    with torch.no_grad():
        model.rope_scaling = scaling
        with_temperature = model(ids)
        model.rope_scaling = RopeScaling("yarn", 8, 4.0, temperature_coef=0.0)
        for layer in model.layers:
            if layer.attn.use_rope:
                layer.attn.q_proj.weight *= logit_factor(scaling, 32)
        in_rope_layers = model(ids)
    torch.testing.assert_close(with_temperature, in_rope_layers, atol=1e-5, rtol=1e-5)


def test_logit_scale_acts_only_beyond_the_training_context():
    cfg = ModelConfig(logit_scale_coef=0.5, train_context=64, attn_logit_scale=1.2)
    assert cfg.logit_scale_at(32) == cfg.logit_scale_at(64) == 1.2
    assert cfg.logit_scale_at(256) == pytest.approx(1.2 * (1 + 0.5 * math.log(4)))
    with pytest.raises(ConfigError, match=r"model\.logit_scale_coef=0\.5 needs model\.train_context"):
        validate_model(ModelConfig(logit_scale_coef=0.5))
    model = tiny_model(no_rope_layers=[0, 0])
    ids = torch.randint(0, 64, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
        model.config.logit_scale_coef, model.config.train_context = 0.7, 32
        at_context = model(ids)
        model.config.train_context = 8
        beyond = model(ids)
    torch.testing.assert_close(at_context, before)
    assert (beyond - before).abs().max() > 1e-4


@pytest.mark.parametrize("target", [-1.0, -0.42, 0.0, 0.37, 1.234, 2.0])
def test_minimise_recovers_a_known_coefficient(target):
    calls = []

    def objective(c: float) -> float:
        calls.append(c)
        return math.log1p((c - target) ** 2) + 0.3 * abs(c - target)

    found = logit_scale.minimise(objective, -1.0, 2.0, 1e-3)
    assert found == pytest.approx(target, abs=1e-3)
    assert len(calls) < 40


def test_the_default_search_interval_allows_a_negative_coefficient():
    assert LogitScaleConfig().low < 0 < LogitScaleConfig().high


def test_fit_reports_an_optimum_at_an_end_of_the_interval_and_what_it_was_fitted_on():
    """A real tiny NoPE model (random weights: on these documents flatter attention keeps helping, so the best c
    is below 0 and the search runs to the low end; the old interval [0, 2] would have reported c = 0 as found)."""
    model = tiny_model(no_rope_layers=[0, 0])
    rng = np.random.default_rng(0)
    # Two sources; documents too short for the longest length (64) are not used, and the count caps the rest.
    sources = {
        "heldout/web": [rng.integers(0, 64, n) for n in (40, 80, 90, 100)],
        "heldout/math": [rng.integers(0, 64, n) for n in (30, 70)],
    }
    fitted = logit_scale.fit(model, sources, [32, 64], 2, 16, -0.5, 0.5, 0.01, 4)
    assert fitted.boundary == "low" and fitted.coef == pytest.approx(-0.5, abs=0.01)
    assert all(p <= u for p, u in zip(fitted.ppl, fitted.ppl_unscaled, strict=True))
    assert fitted.documents == [
        {"source": "heldout/web", "documents": 2, "tokens": 128},
        {"source": "heldout/math", "documents": 1, "tokens": 64},
    ]
    described = logit_scale.describe(fitted)
    assert "in [-0.5, 0.5], at its low end" in described and "web: 2 documents, 128 tokens" in described
    assert (
        logit_scale.fit(model, {"heldout/web": [rng.integers(0, 64, 50)]}, [32, 64], 2, 16, -0.5, 0.5, 0.01, 4) is None
    )
    assert logit_scale.end_hit(2.0, -0.5, 2.0, 0.01) == "high" and logit_scale.end_hit(0.3, -0.5, 2.0, 0.01) is None
    with pytest.raises(ConfigError, match=r"logit_scale.low=-0.5 must be > -0.4809 \(-1 / ln 8\)"):
        validate(EvalConfig(checkpoint="runs/x", out="o", logit_scale=LogitScaleConfig(low=-0.5)))


def test_fit_documents_are_held_out_from_the_report():
    """A fit source gives its documents 0, 2, 4, ... to the fit, 1, 3, 5, ... to the report; other
    sources go to the report whole."""
    web, code = [np.arange(n) for n in range(10, 16)], [np.arange(n) for n in range(20, 23)]
    report, fit = split_heldout({"data/heldout/web": web, "data/heldout/code": code}, ["web"])
    assert {path: [len(d) for d in found] for path, found in report.items()} == {
        "data/heldout/web": [11, 13, 15],
        "data/heldout/code": [20, 21, 22],
    }
    assert list(fit) == ["data/heldout/web"] and [len(d) for d in fit["data/heldout/web"]] == [10, 12, 14]
    assert split_heldout({"data/heldout/web": web}, [])[0] == {"data/heldout/web": web}
    with pytest.raises(ConfigError, match=r"logit_scale.sources=\['prose'\] must name held-out sources"):
        validate(EvalConfig(checkpoint="runs/x", out="o", logit_scale=LogitScaleConfig(sources=["prose"])))


def test_perplexity_uses_the_same_documents_at_every_length():
    # The first document is long enough for 64 tokens but not 128: it must not be scored at 64 either.
    documents = [(np.arange(n) + 7 * i) % 64 for i, n in enumerate((100, 200, 300, 50))]
    found = same_documents(documents, [64, 128], 2)
    assert [len(d) for d in found[64]] == [65, 65] and [len(d) for d in found[128]] == [129, 129]
    for short, long in zip(found[64], found[128], strict=True):
        assert np.array_equal(short, long[:65])
    assert [d[0] for d in found[64]] == [7, 14]
    model = tiny_model()
    result = perplexity(model, found[64], 32, 2)
    assert (result.documents, result.tokens, [first for first, _ in result.buckets]) == (2, 128, [0, 32])
    # Each document's mean NLL is its own perplexity's log; equal lengths make their mean the overall one.
    alone = [perplexity(model, [document], 32, 1).ppl for document in found[64]]
    assert [math.exp(nll) for nll in result.document_nll] == pytest.approx(alone, rel=1e-9)
    assert math.exp(sum(result.document_nll) / 2) == pytest.approx(result.ppl, rel=1e-12)


def test_too_few_documents_for_the_largest_factor_is_one_line_naming_it(caplog):
    loaded = LoadedModel("m", "", tiny_model(), None, Path(), 0, 16, Path())
    cfg = EvalConfig(checkpoint="runs/m", out="o", factors=[1, 4], perplexity=PerplexityConfig(documents=3))
    documents = [np.arange(n) % 64 for n in (100, 40, 70, 30)]
    with caplog.at_level(logging.WARNING, logger="nopetrain.eval"):
        found = scored_documents(loaded, documents, cfg)
    assert {length: [len(d) for d in found[length]] for length in found} == {16: [17, 17], 64: [65, 65]}
    assert [record.getMessage() for record in caplog.records] == [
        "m: perplexity: only 2 of the 3 documents asked for (perplexity.documents) are longer than 64 tokens, which "
        "factor 4 needs; every length uses these 2"
    ]


def test_stored_scale_round_trips_and_a_broken_file_is_named(tmp_path):
    path = tmp_path / logit_scale.FILE
    assert logit_scale.read(path) is None
    documents = [{"source": "heldout/web", "documents": 2, "tokens": 512}]
    fitted = logit_scale.FittedScale(0.41, 64, [128, 256], [10.0, 12.0], [11.0, 15.0], -1.0, 2.0, None, documents)
    logit_scale.write(path, fitted)
    assert logit_scale.read(path) == fitted
    assert [p.name for p in tmp_path.iterdir()] == [logit_scale.FILE]
    path.write_text("{")
    with pytest.raises(ConfigError, match=str(path)):
        logit_scale.read(path)


@pytest.mark.parametrize(
    ("task", "needles", "answers"),
    [("standard", 1, 1), ("multi_key", 4, 1), ("multi_query", 4, 2), ("multi_value", 4, 4)],
)
def test_needle_task_text(task, needles, answers):
    text = niah.needle_task(random.Random(5), task, 4)
    assert text == niah.needle_task(random.Random(5), task, 4)  # same seed, same task
    assert len(text.needles) == needles and len(text.answers) == answers
    assert text.question.startswith("Question: ") and text.question.endswith("\nAnswer:")
    for answer in text.answers:
        assert len(answer) == 7 and answer.isdigit()
        line = next(line for line in text.needles if line.endswith(f", value: {answer}"))
        key = line.removeprefix("key: ").split(",")[0]
        # Unquoted, after a space, as in the needle line (so its words tokenize alike in both).
        assert len(key.split()) == 2 and re.search(rf" {key}( and|\?)", text.question)
    assert sorted(answer for i in text.asked for answer in text.answers if text.needles[i].endswith(answer)) == sorted(
        text.answers
    )  # the asked needles hold the expected values
    if task == "multi_value":
        assert len({line.split(",")[0] for line in text.needles}) == 1
    else:
        assert len({line.split(",")[0] for line in text.needles}) == needles


def char_encode(texts: list[str]) -> list[list[int]]:
    """A byte-level tokenizer, so that positions in the prompt can be checked by hand."""
    return [list(text.encode()) for text in texts]


def test_build_prompt_puts_needles_at_their_depths_and_has_the_exact_length():
    text = niah.needle_task(random.Random(1), "multi_key", 4)
    haystack = "\n".join(f"line {i:02d} of the haystack goes on here." for i in range(40))
    depths = [0.0, 0.25, 0.6, 1.0]
    prompt = niah.build_prompt(text, haystack, depths, 900, char_encode)
    assert len(prompt) == 900
    decoded = bytes(prompt).decode()
    assert decoded.endswith("\n" + text.needles[-1] + "\n" + text.question)  # depth 1: right before the question
    lines = decoded.split("\n")
    # Each needle is a line of its own after round(depth * n) of the n haystack lines that follow the depth-0 one;
    # the lines before that lead in, the first of them cut to the exact length.
    first = lines.index(text.needles[0])
    body = [line for line in lines[first:] if line.startswith("line ")]
    before = [sum(line.startswith("line ") for line in lines[first : lines.index(needle)]) for needle in text.needles]
    assert before == [round(d * len(body)) for d in depths]
    assert first > 0 and not lines[0].startswith("line ") and lines[0].endswith("haystack goes on here.")
    with pytest.raises(ValueError, match="more than the prompt's 100"):
        niah.build_prompt(text, haystack, depths, 100, char_encode)
    with pytest.raises(ValueError, match="too short for a prompt of 9000"):
        niah.build_prompt(text, haystack, depths, 9000, char_encode)


def test_needle_start_is_the_token_where_the_needle_begins():
    text = niah.needle_task(random.Random(2), "standard")
    haystack = "\n".join(f"line {i:02d} of the haystack goes on here." for i in range(40))
    prompt = niah.build_prompt(text, haystack, [0.5], 700, char_encode)
    decoded = bytes(prompt).decode()
    assert niah.needle_start(prompt, text.needles[0], lambda ids: bytes(ids).decode()) == decoded.index(text.needles[0])
    with pytest.raises(ValueError, match="does not hold the needle 'key: absent'"):
        niah.needle_start(prompt, "key: absent", lambda ids: bytes(ids).decode())


def test_haystacks_are_prose_without_lookup_lines():
    lines = ["Some prose here.", "key: calm river, value: 1234567", "Question: what?", "More prose.", "Answer: 7"]
    documents = [np.array([*map(ord, "\n".join(lines)), 0])]
    haystack = niah.haystack_for(documents, random.Random(0), 5, lambda ids: bytes(ids).decode())
    assert haystack == "Some prose here.\nMore prose."
    with pytest.raises(ValueError, match="a haystack needs 500"):
        niah.haystack_for(documents, random.Random(0), 500, lambda ids: bytes(ids).decode())


def test_teacher_forced_scoring_agrees_with_greedy_decoding():
    """A trial scores 1 exactly when greedy decoding writes its answer tokens first, whether it shares a batch with
    trials of other answer lengths or not."""
    model = tiny_model()
    prompts = [
        [int(t) for t in torch.randint(3, 64, (12,), generator=torch.Generator().manual_seed(s))] for s in range(5)
    ]
    written = niah.generate_greedy(model, prompts, max_new_tokens=3, eos_id=-1)
    assert niah.teacher_forced_scores(model, prompts[:2], written[:2]) == [1.0, 1.0]
    other = [*written[1][:-1], (written[1][-1] + 1) % 64]
    assert niah.teacher_forced_scores(model, prompts[:2], [written[0], other]) == [1.0, 0.0]
    answers = [written[0], other, written[2][:1], [(written[3][0] + 1) % 64], written[4][:2]]
    expected = [1.0, 0.0, 1.0, 0.0, 1.0]
    for batch_size in (1, 2, 8):
        assert niah.teacher_forced_scores(model, prompts, answers, batch_size) == expected


def test_answer_ids_are_the_tokens_after_the_question():
    question, answer = "Question: what is the value of the key calm river?\nAnswer:", "1234567"
    ids = niah.answer_ids(char_encode, question, answer)
    assert bytes(ids).decode() == " 1234567"

    def decode(ids: list[int]) -> str:
        return bytes(ids).decode()

    prompt = char_encode([f"some haystack\n{question}"])[0]
    assert niah.ends_like_question(prompt, question, char_encode, decode)
    assert not niah.ends_like_question([*prompt[:-1], ord(";")], question, char_encode, decode)
    # The question's first line may tokenize differently in context; its last line ("Answer:") may not.
    assert niah.ends_like_question(prompt[:-25] + char_encode(["\nAnswer:"])[0], question, char_encode, decode)
    assert not niah.ends_like_question(char_encode(["x Answer:"])[0], question, char_encode, decode)


def test_scoring_is_exact_match_on_seven_digit_values():
    assert niah.score(" 1234567\n", ["1234567"]) == 1.0
    assert niah.score(" 12345678", ["1234567"]) == 0.0  # eight digits are not the value
    assert niah.score(" 7654321, 1234567", ["1234567"]) == 0.0  # the first number written counts
    assert niah.score("", ["1234567"]) == 0.0
    assert niah.score(" 1111111, 3333333", ["1111111", "2222222"]) == 0.5
    assert niah.score(" 2222222 and 1111111", ["1111111", "2222222"]) == 1.0
    asked = ["7654321"]
    assert niah.answered(" 1234567", asked) and not niah.answered(" 12345", asked)
    assert niah.answered(" no\n", ["1234567", "7654321"])


def test_values_of_another_length_are_drawn_scored_and_complete_at_that_length():
    for task in NIAH_TASKS:
        text = niah.needle_task(random.Random(3), task, 4, value_digits=3)
        assert all(len(value) == 3 and value.isdigit() for value in text.answers)
        assert all(re.fullmatch(r"key: .+, value: \d{3}", needle) for needle in text.needles)
    assert niah.score(" 123\n", ["123"]) == 1.0 and niah.score(" 1234", ["123"]) == 0.0
    assert not niah.answered(" 12", ["123"]) and niah.answered(" 123", ["123"])


def niah_row(model: str, method: str, factor: int, successes: int, n: int, **extra) -> dict:
    """A NIAH task's mean as evaluate writes it, with its Wilson interval."""
    low, high = wilson(successes, n)
    cell = {"model": model, "method": method, "context_factor": factor, "context_len": 64 * factor, "metric": "niah"}
    rate = {"value": successes / n, "ci_low": low, "ci_high": high, "interval": "wilson", "n": n}
    return {**cell, "task": "standard", **rate, "successes": successes, "scoring": "teacher_forced", **extra}


def trial_rows(
    model: str, method: str, factor: int, scores: list[float], prompts: str = "p", spans: list[int] | None = None
) -> list[dict]:
    common = {"model": model, "method": method, "context_factor": factor, "context_len": 64 * factor}
    rows = [
        {**common, "metric": TRIAL_METRIC, "task": "standard", "trial": i, "value": v, "prompt_sha256": f"{prompts}{i}"}
        for i, v in enumerate(scores)
    ]
    return rows if spans is None else [{**row, "needle_span": span} for row, span in zip(rows, spans, strict=True)]


def test_report_files(tmp_path):
    rows = [
        {"model": "a", "method": m, "context_factor": f, "context_len": 64 * f, "metric": "ppl", "value": v, "n": 2}
        | {"tokens": 128 * f, "ci_low": v - 1, "ci_high": v + 1, "interval": "bootstrap"}
        for m, f, v in [("none", 1, 10.0), ("none", 2, 20.0), ("yarn", 1, 10.0), ("yarn", 2, 14.0)]
    ]
    fit = {"model": "b", "method": "logit_scale", "context_factor": None, "metric": "logit_scale_c", "value": -0.25}
    rows.append(fit | {"n": 4, "tokens": 512, "source": "web", "boundary": "low"})
    rows += [
        niah_row("a", "none", f, k, 4) | ({"depth": d} if d is not None else {})
        for f, d, k in [(1, None, 2), (1, 0.0, 4), (1, 1.0, 0), (2, None, 1), (2, 0.0, 2), (2, 1.0, 0)]
    ]
    rows.append({**rows[0], "metric": "ppl_bucket", "position": 0})
    rows += trial_rows("a", "none", 1, [1.0, 0.0, 1.0, 0.0])
    files = write_report(rows, tmp_path / "report")
    assert sorted(files) == [
        "niah_by_depth.png",
        "niah_by_length.png",
        "ppl_by_position.png",
        "ppl_vs_length.png",
        "results.csv",
        "results.md",
        "trials.csv",
    ]
    for name in files:
        if name.endswith(".png"):
            assert files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = files["results.md"].read_text()
    assert "## Perplexity (95% bootstrap interval over documents)" in table
    assert "| a | yarn | 10.000 [9.000, 11.000] | 14.000 [13.000, 15.000] |" in table
    # Each rate beside its Wilson interval (2 of 4: [15.0, 85.0]); the title says how trials were scored and how many.
    assert (
        "## NIAH standard (success %, teacher-forced exact match of the answer tokens, n=4 trials per cell, 95% "
        "Wilson interval)" in table
    )
    assert "| a | none | 50.0 [15.0, 85.0] | 25.0 [4.6, 69.9] |" in table
    assert "- a: 2 documents at every length; tokens 128 (1x) / 256 (2x)" in table
    assert "| b | -0.2500 | web: 4 documents, 512 tokens | at the low end of the interval" in table
    assert not table.startswith("# Long-context evaluation\n\n**")  # no gate configured
    results = files["results.csv"].read_text().splitlines()
    assert len(results) == len(rows) - 4 + 1 and "niah_trial" not in files["results.csv"].read_text()
    assert results[0] == ",".join(COLUMNS) and "ci_low,ci_high,interval,n,successes" in results[0]
    trials = files["trials.csv"].read_text().splitlines()
    assert trials[0] == ",".join(TRIAL_COLUMNS) and trials[1] == "a,none,1,64,standard,0,,p0,,,1.0"


def report_lines(rows: list[dict], **gate) -> list[str]:
    return markdown(rows, ReportConfig(gate=GateConfig(**gate))).splitlines()


def test_gate_says_whether_retrieval_was_learned_in_context():
    rows = [niah_row("rope", "none", 1, 135, 300), niah_row("rope", "none", 2, 3, 300)]
    below = report_lines(rows, model="rope")
    assert below[:3] == [
        "# Long-context evaluation",
        "",
        "**Underpowered: retrieval not learned in context.** rope standard NIAH at 1x: 45.0% [39.5, 50.7] (n=300) "
        "< 80% gate; the comparisons beyond the context below carry no information about length generalisation.",
    ]
    rows[0] = niah_row("rope", "none", 1, 276, 300)
    assert (
        report_lines(rows, model="rope")[2] == "Gate passed: rope standard NIAH at 1x: 92.0% [88.4, 94.6] (n=300) "
        ">= 80% gate."
    )
    # The gate's own threshold, method and factor; a cell that was not evaluated is said to be missing.
    at_2x = report_lines(rows, model="rope", factor=2, threshold=0.01)[2]
    assert at_2x.startswith("Gate passed: rope standard NIAH at 2x: 1.0% [")
    assert report_lines(rows, model="rope", threshold=0.95)[2].startswith("**Underpowered")
    assert report_lines(rows, model="rope", method="yarn")[2] == (
        "**Gate not evaluated: no result for rope/yarn standard NIAH at 1x.** Without it, the comparisons beyond the "
        "context below are not shown to carry information about length generalisation."
    )


def test_paired_comparison_is_mcnemar_on_the_same_prompts():
    a = [1.0] * 10 + [0.0] * 2 + [1.0] * 5 + [0.0] * 3
    b = [0.0] * 10 + [1.0] * 2 + [1.0] * 5 + [0.0] * 3
    rows = [niah_row("drope", "logit_scale", 2, 15, 20), niah_row("rope", "yarn", 2, 7, 20)]
    rows += trial_rows("drope", "logit_scale", 2, a) + trial_rows("rope", "yarn", 2, b)
    rows += trial_rows("drope", "logit_scale", 4, a) + trial_rows("rope", "yarn", 4, b, prompts="q")
    paired = [PairedConfig(a="drope/logit_scale", b="rope/yarn", tasks=["standard", "multi_key"], factors=[2, 4])]
    table = markdown(rows, ReportConfig(paired=paired))
    section = table[table.index("## Paired comparison (McNemar, same prompts)") :].splitlines()
    _, _, p = mcnemar([v == 1 for v in a], [v == 1 for v in b])
    assert section[2] == (
        "| a | b | task | factor | n | a right % | b right % | a only right | b only right | p (exact, two-sided) |"
    )
    assert section[4:8] == [
        f"| drope/logit_scale | rope/yarn | standard | 2x | 20 | 75.0 | 35.0 | 10 | 2 | {p:.3g} |",
        "| drope/logit_scale | rope/yarn | standard | 4x | - | - | - | - | - | not the same prompts |",
        "| drope/logit_scale | rope/yarn | multi_key | 2x | - | - | - | - | - | "
        "no trials for drope/logit_scale and rope/yarn |",
        "| drope/logit_scale | rope/yarn | multi_key | 4x | - | - | - | - | - | "
        "no trials for drope/logit_scale and rope/yarn |",
    ]
    assert "a trial is right with all" not in table
    # Greedy per-value recall: only a whole answer (score 1) is right, and the table says so.
    rows = trial_rows("drope", "logit_scale", 2, [1.0, 0.5, 0.75, 0.0]) + trial_rows("rope", "yarn", 2, [0.5] * 4)
    table = markdown(rows, ReportConfig(paired=paired[:1]))
    assert "| drope/logit_scale | rope/yarn | standard | 2x | 4 | 25.0 | 0.0 | 1 | 0 | 1 |" in table
    assert "a trial is right with all" in table


def test_standard_niah_is_split_by_needle_span_against_the_trained_context():
    """A trial is within when its needle-to-answer span fits the trained context (64 here), beyond when it does not;
    each cell is the rate of its trials with its Wilson interval, n in the column's header."""
    rows = [niah_row("a", "none", f, 1, 4) for f in (1, 2)]
    rows += trial_rows("a", "none", 1, [1.0, 1.0, 0.0, 1.0], spans=[64, 40, 20, 10])
    rows += trial_rows("a", "none", 2, [0.0, 1.0, 1.0, 0.0], spans=[128, 65, 64, 10])
    rows += trial_rows("b", "yarn", 2, [1.0, 1.0, 1.0, 1.0], spans=[128, 65, 64, 10])
    lines = report_lines(rows)
    header = "| model | method | 1x within (n=4) | 2x within (n=2) | 2x beyond (n=2) |"
    at = lines.index(header)
    assert lines[at - 4] == "## NIAH standard by needle-to-answer span (success %, 95% Wilson interval)"
    low, high = wilson(3, 4)
    assert (
        lines[at + 2]
        == f"| a | none | 75.0 [{100 * low:.1f}, {100 * high:.1f}] | 50.0 [9.5, 90.5] | 50.0 [9.5, 90.5] |"
    )
    assert lines[at + 3].startswith("| b | yarn | - | 100.0 [34.2, 100.0] | 100.0 [34.2, 100.0] |")
    assert "## NIAH standard by needle" not in "\n".join(report_lines(rows[:2]))  # no spans, no section


def test_a_rate_has_a_wilson_interval_when_scores_are_0_or_1_else_a_bootstrap():
    binary = rate([1.0, 0.0, 1.0, 1.0], seed=0)
    assert binary == {"value": 0.75, "ci_low": wilson(3, 4)[0], "ci_high": wilson(3, 4)[1], "interval": "wilson"} | {
        "n": 4,
        "successes": 3,
    }
    fractional = rate([1.0, 0.5, 0.25, 0.0, 0.75], seed=0)
    assert (fractional["interval"], fractional["successes"], fractional["value"]) == ("bootstrap", 1, 0.5)
    assert (fractional["ci_low"], fractional["ci_high"]) == bootstrap_mean([1.0, 0.5, 0.25, 0.0, 0.75], seed=0)


def test_report_cells_name_evaluated_models_methods_tasks_and_factors():
    def config(**report) -> EvalConfig:
        return EvalConfig(
            models={"rope": "runs/rope", "drope": "runs/drope"},
            out="o",
            niah=NiahConfig(tasks=["standard"]),
            rope_scaling=RopeScalingConfig(methods=["yarn"]),
            report=ReportConfig(**report),
        )

    validate(config(gate=GateConfig(model="rope"), paired=[PairedConfig(a="drope/logit_scale", b="rope/yarn")]))
    for report, message in [
        ({"gate": GateConfig(model="nope")}, "report.gate names model 'nope'; the evaluated models are"),
        ({"gate": GateConfig(model="rope", threshold=80)}, r"report.gate.threshold=80 must be in \(0, 1\]"),
        ({"gate": GateConfig(model="rope", factor=3)}, r"report.gate names factor 3, not among factors=\[1, 2, 4, 8\]"),
        (
            {"paired": [PairedConfig(a="drope/logit_scale", b="rope/pi")]},
            r"report\.paired\[0\]\.b names method 'pi'; the evaluated methods are \['none', 'yarn', 'logit_scale'\]",
        ),
        ({"paired": [PairedConfig(a="drope", b="rope/yarn")]}, r"report.paired\[0\].a='drope' must be model/method"),
        (
            {"paired": [PairedConfig(a="drope/none", b="rope/none", tasks=["multi_key"])]},
            r"report.paired\[0\].a names task 'multi_key', not among niah.tasks=\['standard'\]",
        ),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate(config(**report))
    with pytest.raises(ConfigError, match=r"niah\.scoring='beam' must be one of"):
        validate(EvalConfig(checkpoint="runs/x", out="o", niah=NiahConfig(scoring="beam")))
    # Whether a model has the method is known once it is loaded (RoPE layers or not).
    cfg = config(paired=[PairedConfig(a="drope/yarn", b="rope/yarn")])
    with pytest.raises(ConfigError, match=r"report.paired\[0\].a names drope/yarn, but drope is evaluated with"):
        check_report_methods("drope", ["none", "logit_scale"], cfg)
    check_report_methods("rope", ["none", "yarn"], cfg)


def test_progress_estimates_the_time_left_by_length_factor():
    units = [Unit("a", "none", 1), Unit("a", "none", 2), Unit("a", "none", 4), Unit("a", "logit_scale", 8)]
    progress = Progress(units)
    progress.drop(units[3:])  # no logit scale could be fitted
    # 10 s for factor 1: 10 s per factor, 6 factors to go.
    assert progress.computed(units[0], 10.0) == "1/3 units done, ~1.0 min left"
    progress.reused(units[1])  # costs nothing and leaves 4 factors
    assert progress.computed(units[2], 70.0) == "3/3 units done, ~0.0 min left"


def test_a_units_fingerprint_changes_with_what_its_rows_depend_on(monkeypatch):
    base = EvalConfig(models={"a": "runs/a"}, out="o")
    model = {"checkpoint": "runs/a/checkpoints/step_00000008", "step": 8, "checksums_sha256": "ab"}
    same = fingerprint(base, model, None)
    unrelated = EvalConfig(
        models={"a": "runs/a", "b": "runs/b"},
        out="elsewhere",
        device="cpu",
        rope_scaling=RopeScalingConfig(methods=["yarn"]),
        report=ReportConfig(gate=GateConfig(model="a")),
        logit_scale=LogitScaleConfig(refit=True),
    )
    assert fingerprint(unrelated, model, None) == same
    assert fingerprint(EvalConfig(models={"a": "runs/a"}, out="o", niah=NiahConfig(trials=3)), model, None) != same
    assert fingerprint(base, model, 0.25) != same
    # Another step, or the same step trained again in place (other weights, so other checksums).
    for changed in ({"step": 10}, {"checksums_sha256": "cd"}):
        assert fingerprint(base, {**model, **changed}, None) != same
    monkeypatch.setattr(partial, "ROWS_SCHEMA", partial.ROWS_SCHEMA + 1)  # rows of another schema
    assert fingerprint(base, model, None) != same


def test_unit_files_round_trip_rows_and_an_unreadable_one_matches_no_fingerprint(tmp_path):
    store, unit = UnitStore(tmp_path), Unit("rope", "yarn", 2)
    assert store.read(unit) is None
    rows = [{"metric": "niah", "value": 0.1 + 0.2, "depth": None, "n": 3, "ci_low": 1e-300}]
    store.write(unit, "abc", {"checkpoint": "runs/rope", "step": 8, "checksums_sha256": None}, rows)
    assert store.read(unit) == ("abc", rows)
    assert [p.name for p in (tmp_path / "partial" / "rope").iterdir()] == ["yarn_2x.json"]
    store.path(unit).write_text('{"rows": []')
    assert store.read(unit) == ("", [])


def test_module_imports_stay_light():
    # nopetrain.model imports nopetrain.eval.rope_scaling; the package must not import the evaluation stack back.
    code = "import nopetrain.model, sys; print('nopetrain.eval.evaluate' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "False"


def test_every_plotted_series_has_its_own_colour_marker_and_line():
    # 12 series once shared 10 colours, and logit_scale at c = 0 hid none behind it.
    models = ["rope", "rope_nope4", "nope", "drope"]
    series = [(model, method) for model in models for method in ("none", "pi", "ntk", "yarn", "logit_scale")]
    styles = series_styles(series)
    looks = {(str(s["color"]), s["linestyle"], s["marker"]) for s in styles.values()}
    assert len(looks) == len(series)
    assert styles[("nope", "none")]["marker"] != styles[("nope", "logit_scale")]["marker"]


def test_the_trained_context_is_the_length_the_run_ended_at():
    short_first = {"seq_len": 128, "curriculum": {"phases": [{"name": "short", "seq_len": 64}, {"name": "main"}]}}
    assert models.trained_context(short_first) == 128
    long_last = {"seq_len": 128, "curriculum": {"phases": [{"name": "main"}, {"name": "long", "seq_len": 512}]}}
    assert models.trained_context(long_last) == 512
    assert models.trained_context({"seq_len": 256, "curriculum": {"phases": []}}) == 256
