"""nopetrain/eval/perplexity.py: the same documents at every length."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nopetrain.eval.perplexity import perplexity, same_documents

from ..helpers import tiny_model


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
