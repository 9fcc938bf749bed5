"""nopetrain/eval/partial.py: units of an evaluation, their fingerprints and files, the progress estimate."""

from __future__ import annotations

from nopetrain.eval import partial
from nopetrain.eval.config import (
    EvalConfig,
    GateConfig,
    LogitScaleConfig,
    NiahConfig,
    ReportConfig,
    RopeScalingConfig,
)
from nopetrain.eval.partial import Progress, Unit, UnitStore, fingerprint


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
