"""The evaluation's intervals and paired test against values computed independently (scipy is not a dependency:
the references are textbook values and brute-force sums)."""

from __future__ import annotations

import math
import random

import pytest

from nopetrain.eval.stats import bootstrap_mean, bootstrap_ppl, mcnemar, wilson


def test_wilson_matches_published_values():
    # Wilson (1927) / Newcombe (1998) table: 0 of 20 -> [0, 0.1611]; 10 of 20 -> [0.2993, 0.7007].
    assert wilson(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)
    assert wilson(10, 20) == pytest.approx((0.2993, 0.7007), abs=1e-4)
    low, high = wilson(240, 300)
    assert low < 0.8 < high and high - low < 0.1  # 300 trials pin a rate to about +-4.5 points
    with pytest.raises(ValueError, match="successes=5"):
        wilson(5, 4)


def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs():
    first = [True] * 10 + [False] * 2 + [True] * 5 + [False] * 3
    second = [False] * 10 + [True] * 2 + [True] * 5 + [False] * 3
    only_first, only_second, p = mcnemar(first, second)
    assert (only_first, only_second) == (10, 2)
    assert p == pytest.approx(2 * sum(math.comb(12, k) for k in range(3)) / 2**12)  # 0.0386
    assert mcnemar(first, first) == (0, 0, 1.0)
    with pytest.raises(ValueError, match="not the same ones"):
        mcnemar(first, second[:-1])


def test_bootstrap_interval_covers_the_perplexity_and_narrows_with_documents():
    rng = random.Random(0)
    few = [rng.gauss(3.0, 0.5) for _ in range(8)]
    many = [rng.gauss(3.0, 0.5) for _ in range(200)]
    for nll in (few, many):
        low, high = bootstrap_ppl(nll)
        assert low < math.exp(sum(nll) / len(nll)) < high
    assert bootstrap_ppl(many)[1] - bootstrap_ppl(many)[0] < bootstrap_ppl(few)[1] - bootstrap_ppl(few)[0]
    assert bootstrap_ppl(few) == bootstrap_ppl(few)  # seeded


def test_bootstrap_mean_covers_the_mean_of_fractional_scores():
    scores = [1.0, 0.5, 0.25, 0.75, 0.0, 1.0, 0.5, 0.5] * 5
    low, high = bootstrap_mean(scores)
    assert low < sum(scores) / len(scores) < high and high - low < 0.3
    assert bootstrap_mean([0.5] * 10) == (0.5, 0.5)
    # bootstrap_ppl is its interval of the mean NLL, exponentiated.
    assert bootstrap_ppl(scores) == pytest.approx(tuple(math.exp(end) for end in (low, high)))
    with pytest.raises(ValueError, match="no values"):
        bootstrap_mean([])
