"""Perplexity of whole held-out documents cut to L tokens, overall and by position bucket.

Only documents longer than L are used (L inputs at positions 0..L-1 and the L tokens that follow them), so every
position is a real position in its document: perplexity at position p measures what the model makes of p tokens
of context, which is the question length generalisation asks. Lengths are compared on the same documents
(`same_documents`: long enough for the longest, cut to each), so a column differs from the next in length only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from nopetrain.model import Transformer


@dataclass
class Perplexity:
    length: int
    documents: int
    # Tokens predicted: documents x length.
    tokens: int
    ppl: float
    # (first position, perplexity) per bucket of positions.
    buckets: list[tuple[int, float]]
    # Each document's mean next-token NLL, in the order given.
    document_nll: list[float]


def long_documents(documents: list[np.ndarray], length: int, count: int) -> list[np.ndarray]:
    """The first `count` (or fewer) documents with more than `length` tokens, cut to `length` + 1."""
    found = []
    for document in documents:
        if len(document) > length:
            found.append(document[: length + 1])
            if len(found) == count:
                break
    return found


def same_documents(documents: list[np.ndarray], lengths: list[int], count: int) -> dict[int, list[np.ndarray]]:
    """The first `count` (or fewer) documents longer than the longest of `lengths`, cut to each length: every
    length scores the same texts."""
    longest = long_documents(documents, max(lengths), count)
    return {length: [document[: length + 1] for document in longest] for length in lengths}


@torch.no_grad()
def token_nll(model: Transformer, documents: list[np.ndarray], batch_size: int) -> torch.Tensor:
    """Next-token negative log-likelihood (fp64, on the host), documents x positions, over documents of equal
    length."""
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(documents), batch_size):
        batch = torch.as_tensor(np.stack(documents[start : start + batch_size]), dtype=torch.long, device=device)
        logits = model(batch[:, :-1]).float()
        rows.append(F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none").double().cpu())
    return torch.cat(rows)


def perplexity(model: Transformer, documents: list[np.ndarray], bucket: int, batch_size: int) -> Perplexity:
    """Perplexity of `documents` (each L + 1 tokens, from `long_documents`) overall and per `bucket` positions, and
    each document's mean NLL (the documents are of equal length, so the overall perplexity, token-weighted, is also
    exp of the mean of these: what a bootstrap over documents resamples)."""
    nll = token_nll(model, documents, batch_size)
    by_position = nll.mean(0)
    length = len(by_position)
    buckets = [
        (first, math.exp(by_position[first : first + bucket].mean().item())) for first in range(0, length, bucket)
    ]
    document_nll = nll.mean(1).tolist()
    ppl = math.exp(nll.mean().item())
    return Perplexity(length, len(documents), length * len(documents), ppl, buckets, document_nll)
