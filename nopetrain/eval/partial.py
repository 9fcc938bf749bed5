"""An evaluation's finished units, kept so that an interrupted one resumes from them, and its progress.

A unit is one model x method x length factor: its perplexity rows, its NIAH rows and every trial's score. Each is
written as it finishes to OUT/partial/MODEL/METHOD_Fx.json (atomically: a killed evaluation leaves whole files only)
with a fingerprint of what its rows depend on: the evaluation config, less the keys that do not change a unit
(`UNIT_FREE_KEYS`), the checkpoint (path, step and the sha256 of its checksums.json) and, for `logit_scale`, the
fitted c. A later evaluation into the same OUT loads the units whose fingerprint matches instead of computing them,
and computes again those whose does not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple

from nopetrain.atomic import write_bytes
from nopetrain.eval.config import EvalConfig

FOLDER = "partial"
# Where the report goes and what it shows, which models and methods there are (each unit is one of them), whether to
# fit c again (the fitted c itself is in the fingerprint), and the device.
UNIT_FREE_KEYS = ("out", "wandb", "report", "models", "checkpoint", "device")
UNIT_FREE_SUBKEYS = (("rope_scaling", "methods"), ("logit_scale", "refit"))
# The rows' schema, raised when a unit's rows gain or change a field, so that units of an older schema are computed
# again instead of mixed with new ones (2: trial rows carry needle_span).
ROWS_SCHEMA = 2


class Unit(NamedTuple):
    model: str
    method: str
    factor: int


def fingerprint(cfg: EvalConfig, model: dict[str, Any], coef: float | None) -> str:
    """The sha256 of what a unit's rows depend on: the config but UNIT_FREE_KEYS and UNIT_FREE_SUBKEYS, the model's
    identity (`LoadedModel.identity`), the logit-scale c its method applies (None for the other methods) and
    ROWS_SCHEMA."""
    config = dataclasses.asdict(cfg)
    for key in UNIT_FREE_KEYS:
        del config[key]
    for section, key in UNIT_FREE_SUBKEYS:
        del config[section][key]
    identity = {"config": config, "model": model, "logit_scale_coef": coef, "rows_schema": ROWS_SCHEMA}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


class UnitStore:
    """The unit files under OUT/partial/."""

    def __init__(self, out: str | Path) -> None:
        self.folder = Path(out) / FOLDER

    def path(self, unit: Unit) -> Path:
        return self.folder / unit.model / f"{unit.method}_{unit.factor}x.json"

    def read(self, unit: Unit) -> tuple[str, list[dict[str, Any]]] | None:
        """(fingerprint, rows) of a finished unit, or None when it has none; an unreadable file (written by hand or
        by another version) has fingerprint "", which matches nothing, so the unit is computed again."""
        path = self.path(unit)
        if not path.is_file():
            return None
        try:
            stored = json.loads(path.read_text())
            return stored["fingerprint"], stored["rows"]
        except (ValueError, KeyError, TypeError):
            return "", []

    def write(self, unit: Unit, unit_fingerprint: str, model: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        """Writes a finished unit's rows with its fingerprint and, to read, the model's identity."""
        path = self.path(unit)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"fingerprint": unit_fingerprint, **unit._asdict(), "model_identity": model, "rows": rows}
        write_bytes(path, json.dumps(record).encode())


class Progress:
    """Units done out of all, and the time left: the seconds per length factor of the units computed so far times
    the factors of those left (a unit's cost grows with its length; reused units cost nothing)."""

    def __init__(self, units: list[Unit]) -> None:
        self.total = len(units)
        self.done = 0
        self.factors_left = sum(unit.factor for unit in units)
        self.seconds = 0.0
        self.factors_computed = 0

    def drop(self, units: list[Unit]) -> None:
        """Units planned that will not run (a logit scale that could not be fitted)."""
        self.total -= len(units)
        self.factors_left -= sum(unit.factor for unit in units)

    def reused(self, unit: Unit) -> None:
        self.done += 1
        self.factors_left -= unit.factor

    def computed(self, unit: Unit, seconds: float) -> str:
        """Counts `unit` done in `seconds`; returns "k/N units done, ~M min left"."""
        self.done += 1
        self.factors_left -= unit.factor
        self.seconds += seconds
        self.factors_computed += unit.factor
        minutes = self.seconds / self.factors_computed * self.factors_left / 60
        return f"{self.done}/{self.total} units done, ~{minutes:.1f} min left"
