"""nopetrain/eval/evaluate.py without a trained model: held-out documents, rates and their intervals, which
methods a report asks for."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from nopetrain.config import ConfigError
from nopetrain.eval.config import (
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
from nopetrain.eval.stats import bootstrap_mean, wilson

from ..helpers import tiny_model


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
