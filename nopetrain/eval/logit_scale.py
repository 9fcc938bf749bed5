"""DroPE's logit scale for long inputs: beta = 1 + c ln(s), s = max(1, input length / training context).

c is fitted by minimising the mean log-perplexity of held-out documents at the target lengths (a grid over
[low, high], then golden-section search around its best point), stored beside the checkpoint as
logit_scale.json (with the lengths and perplexities it was fitted on) and applied through
`ModelConfig.logit_scale_coef`, so evaluation, generation and exports all see it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from nopetrain.config import ConfigError
from nopetrain.data_pipelines.atomic import write_bytes
from nopetrain.eval.perplexity import perplexity
from nopetrain.model import Transformer

FILE = "logit_scale.json"
GRID_POINTS = 9
_GOLDEN = (math.sqrt(5) - 1) / 2


@dataclass
class FittedScale:
    coef: float
    train_context: int
    lengths: list[int]
    # Held-out perplexity at each length with the fitted c, and with c = 0.
    ppl: list[float]
    ppl_unscaled: list[float]


def read(path: Path) -> FittedScale | None:
    if not path.is_file():
        return None
    try:
        return FittedScale(**json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path}: not a logit scale file ({err}); delete it to fit again") from None


def write(path: Path, scale: FittedScale) -> None:
    write_bytes(path, (json.dumps(asdict(scale), indent=2) + "\n").encode())


def minimise(objective: Callable[[float], float], low: float, high: float, tolerance: float) -> float:
    """The argmin of a function of one variable on [low, high]: the best of a grid, then golden-section search in
    the bracket of its neighbours until it is narrower than `tolerance`."""
    grid = np.linspace(low, high, GRID_POINTS)
    values = [objective(float(x)) for x in grid]
    best = int(np.argmin(values))
    a, b = float(grid[max(best - 1, 0)]), float(grid[min(best + 1, GRID_POINTS - 1)])
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = objective(c), objective(d)
    while b - a > tolerance:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = objective(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = objective(d)
    candidates = [(values[best], float(grid[best])), (fc, c), (fd, d)]
    return min(candidates)[1]


def fit(
    model: Transformer,
    documents: dict[int, list[np.ndarray]],
    train_context: int,
    low: float,
    high: float,
    tolerance: float,
    batch_size: int,
) -> FittedScale:
    """Fits c for `model` on held-out `documents` per target length (from perplexity.long_documents)."""
    cfg = model.config
    lengths = sorted(documents)

    def ppl_at(coef: float) -> list[float]:
        cfg.logit_scale_coef, cfg.train_context = coef, train_context
        return [perplexity(model, documents[length], train_context, batch_size).ppl for length in lengths]

    def objective(coef: float) -> float:
        return float(np.mean(np.log(ppl_at(coef))))

    unscaled = ppl_at(0.0)
    coef = minimise(objective, low, high, tolerance)
    return FittedScale(coef, train_context, lengths, ppl_at(coef), unscaled)
