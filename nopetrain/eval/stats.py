"""Intervals and tests for the evaluation's rates: a table of success rates means nothing without its n and its
uncertainty, and two arms compared on the same prompts are compared pair by pair.

- `wilson`: the 95% Wilson score interval of k successes in n trials (well-behaved at 0 and n, unlike the normal one).
- `mcnemar`: the exact (binomial) McNemar test of two methods scored on the same trials.
- `bootstrap_mean`: a percentile bootstrap interval of a mean (fractional trial scores).
- `bootstrap_ppl`: a percentile bootstrap interval of perplexity over documents.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z_95 = 1.959963984540054


def wilson(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval for `successes` of `trials`."""
    if trials <= 0:
        raise ValueError(f"trials={trials} must be positive")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes={successes} must be in [0, trials={trials}]")
    rate = successes / trials
    denominator = 1 + z * z / trials
    centre = (rate + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar(first: Sequence[bool], second: Sequence[bool]) -> tuple[int, int, float]:
    """(first only right, second only right, two-sided exact p) for two methods' outcomes on the same trials."""
    if len(first) != len(second):
        raise ValueError(f"the methods were scored on {len(first)} and {len(second)} trials, not the same ones")
    only_first = sum(a and not b for a, b in zip(first, second, strict=True))
    only_second = sum(b and not a for a, b in zip(first, second, strict=True))
    discordant = only_first + only_second
    if discordant == 0:
        return 0, 0, 1.0
    tail = sum(math.comb(discordant, k) for k in range(min(only_first, only_second) + 1)) / 2**discordant
    return only_first, only_second, min(1.0, 2 * tail)


def bootstrap_mean(
    values: Sequence[float], samples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """(low, high) of a percentile bootstrap interval of the mean of `values`, resampled with replacement (for
    rates whose trials score fractions, where Wilson's binomial interval does not apply)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("no values to bootstrap")
    rng = np.random.default_rng(seed)
    means = array[rng.integers(0, array.size, size=(samples, array.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def bootstrap_ppl(
    document_nll: Sequence[float], samples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """(low, high) of a percentile bootstrap interval of exp(mean NLL), resampling documents (each document's mean
    next-token NLL, all of equal length) with replacement."""
    low, high = bootstrap_mean(document_nll, samples, seed, level)
    return math.exp(low), math.exp(high)
