"""nopetrain/eval/logit_scale.py: the model's logit scale beyond the training context, the fit of c, its file."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nopetrain.config import ConfigError, ModelConfig, validate_model
from nopetrain.eval import logit_scale
from nopetrain.eval.config import (
    EvalConfig,
    LogitScaleConfig,
    validate,
)

from ..helpers import tiny_model


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
