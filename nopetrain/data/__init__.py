"""Token streams for the trainer: one interface, several sources.

A stream yields this rank's micro-batches in order and can save and restore its position exactly, so that a
resumed run sees the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from nopetrain.config import TrainConfig


@dataclass
class Batch:
    input_ids: torch.Tensor  # (micro_batch, seq) int64
    labels: torch.Tensor  # (micro_batch, seq) int64, -100 where no loss is taken
    position_ids: torch.Tensor | None = None  # (micro_batch, seq); None means 0..seq-1

    def to(self, device: torch.device) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(move(self.input_ids), move(self.labels), move(self.position_ids))


class TokenStream(Protocol):
    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def build_stream(cfg: TrainConfig, rank: int, world_size: int) -> TokenStream:
    from nopetrain.data.synthetic import SyntheticStream

    return SyntheticStream(cfg, rank, world_size)
