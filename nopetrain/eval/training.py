"""Held-out perplexity at multiples of the training context, every `eval.every` steps of a training run.

Every rank calls it (ZeRO-3 gathers parameters inside the forward), on the same documents; the values are read back
to the host only on these steps."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from nopetrain.config import TrainConfig
from nopetrain.data.shards import read_documents
from nopetrain.eval.perplexity import long_documents, perplexity


class TrainingEval:
    def __init__(self, cfg: TrainConfig) -> None:
        self.factors, self.count = list(cfg.eval.factors), cfg.eval.documents
        self.documents: list[np.ndarray] = read_documents(
            cfg.eval.source, cfg.model.vocab_size, f"eval.source={cfg.eval.source}"
        )[0]

    @torch.no_grad()
    def __call__(self, model: nn.Module, context: int) -> dict[str, float]:
        """eval/ppl_{k}x for each factor k with at least one held-out document longer than k x `context`."""
        metrics = {}
        for factor in self.factors:
            found = long_documents(self.documents, factor * context, self.count)
            if found:
                metrics[f"eval/ppl_{factor}x"] = perplexity(model, found, factor * context, batch_size=1).ppl
        return metrics
