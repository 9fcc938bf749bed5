"""A synthetic token source: sequences walk a fixed random sparse bigram table.

Each global sample is a pure function of (seed, sample index), and rank r of W takes micro-batch slice r of every
W, so one process with accumulation and W processes see the same global batches. Its loss falls from ln(vocab)
toward ln(successors_per_token), which makes a run's progress visible without any data on disk.
"""

from __future__ import annotations

from typing import Any

import torch

from nopetrain.config import ConfigError, TrainConfig
from nopetrain.data import Batch


class SyntheticStream:
    tokenizer = None  # token ids are generated, not encoded text

    def __init__(self, cfg: TrainConfig, rank: int, world_size: int) -> None:
        self.vocab_size = cfg.model.vocab_size
        self.seq_len = cfg.seq_len
        self.micro_batch_size = cfg.micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.seed = cfg.seed
        table_rng = torch.Generator().manual_seed(cfg.seed)
        self.successors = torch.randint(
            self.vocab_size, (self.vocab_size, cfg.data.successors_per_token), generator=table_rng
        )
        # Samples consumed by all ranks together; a rank's next slice follows from it.
        self.global_samples = 0

    def _sample(self, index: int) -> torch.Tensor:
        rng = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        choices = torch.randint(self.successors.shape[1], (self.seq_len,), generator=rng)
        tokens = torch.empty(self.seq_len + 1, dtype=torch.long)
        tokens[0] = torch.randint(self.vocab_size, (1,), generator=rng)
        for i in range(self.seq_len):
            tokens[i + 1] = self.successors[tokens[i], choices[i]]
        return tokens

    def next_batch(self) -> Batch:
        first = self.global_samples + self.rank * self.micro_batch_size
        tokens = torch.stack([self._sample(first + i) for i in range(self.micro_batch_size)])
        self.global_samples += self.micro_batch_size * self.world_size
        return Batch(input_ids=tokens[:, :-1], labels=tokens[:, 1:])

    def state_dict(self) -> dict[str, Any]:
        return {"global_samples": self.global_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_samples = int(state["global_samples"])

    def set_weights(self, weights: dict[str, float]) -> None:
        if weights:
            raise ConfigError(f"data.kind=synthetic has no sources to weight; got {sorted(weights)}")

    @staticmethod
    def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
        """The position is global, the same on every rank."""
        return states[0]

    def stats(self) -> dict[str, float]:
        return {"samples/synthetic": float(self.global_samples)}

    def close(self) -> None:
        """Nothing to release: the generator holds no files or workers."""
