"""DroPE's logit scale for long inputs: beta = 1 + c ln(s), s = max(1, input length / training context).

c is fitted by minimising the mean log-perplexity of held-out documents at the target lengths (the same documents
at each, see `perplexity.same_documents`; a grid over [low, high], then golden-section search around its best
point), stored beside the checkpoint as logit_scale.json (with the documents, lengths and perplexities it was
fitted on, and whether the optimum is at an end of the interval) and applied through
`ModelConfig.logit_scale_coef`, so evaluation, generation and exports all see it. c < 0 (beta < 1, flatter
attention at long inputs) is a legitimate optimum, so the default interval includes negative values.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from nopetrain.atomic import write_bytes
from nopetrain.config import ConfigError
from nopetrain.eval.perplexity import perplexity, same_documents
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
    # The search interval, and "low" or "high" when the optimum is within the tolerance of that end (the best c
    # may then lie beyond it), else None.
    low: float
    high: float
    boundary: str | None
    # What it was fitted on, per held-out source: {"source": path, "documents": n, "tokens": n x longest length}.
    documents: list[dict]


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
    sources: dict[str, list[np.ndarray]],
    lengths: list[int],
    count: int,
    train_context: int,
    low: float,
    high: float,
    tolerance: float,
    batch_size: int,
) -> FittedScale | None:
    """Fits c for `model` at `lengths` on up to `count` documents of each held-out source (path -> documents), the
    same ones at every length; None when no document is longer than the longest length."""
    chosen = {source: same_documents(documents, lengths, count) for source, documents in sources.items()}
    used = [
        {
            "source": source,
            "documents": len(by_length[max(lengths)]),
            "tokens": len(by_length[max(lengths)]) * max(lengths),
        }
        for source, by_length in chosen.items()
        if by_length[max(lengths)]
    ]
    if not used:
        return None
    targets = {length: [d for by_length in chosen.values() for d in by_length[length]] for length in lengths}
    cfg = model.config

    def ppl_at(coef: float) -> list[float]:
        cfg.logit_scale_coef, cfg.train_context = coef, train_context
        return [perplexity(model, targets[length], train_context, batch_size).ppl for length in lengths]

    def objective(coef: float) -> float:
        return float(np.mean(np.log(ppl_at(coef))))

    unscaled = ppl_at(0.0)
    coef = minimise(objective, low, high, tolerance)
    boundary = end_hit(coef, low, high, tolerance)
    return FittedScale(coef, train_context, lengths, ppl_at(coef), unscaled, low, high, boundary, used)


def end_hit(coef: float, low: float, high: float, tolerance: float) -> str | None:
    """ "low" or "high" when `coef` is within `tolerance` of that end of [low, high]: the search then cannot tell
    the optimum from the end, which may hide a better c beyond it."""
    if coef - low <= tolerance:
        return "low"
    return "high" if high - coef <= tolerance else None


def describe(fitted: FittedScale) -> str:
    """Where c lies in its search interval and what it was fitted on, for the log and the report."""
    where = f"in [{fitted.low:g}, {fitted.high:g}]"
    if fitted.boundary is not None:
        where += f", at its {fitted.boundary} end: the best c may lie beyond (widen logit_scale.{fitted.boundary})"
    on = "; ".join(
        f"{Path(d['source']).name}: {d['documents']} documents, {d['tokens']} tokens" for d in fitted.documents
    )
    return f"c={fitted.coef:.4f} {where}, fitted at lengths {fitted.lengths} on {on}"
