"""Token streams for the trainer: one interface, several sources.

A stream yields this rank's micro-batches in order and can save and restore its position exactly, so that a
resumed run sees the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from nopetrain.config import TrainConfig
from nopetrain.kernels import DocumentSegments


@dataclass
class Batch:
    input_ids: torch.Tensor  # (micro_batch, seq) int64
    labels: torch.Tensor  # (micro_batch, seq) int64, -100 where no loss is taken
    position_ids: torch.Tensor | None = None  # (micro_batch, seq); None means 0..seq-1
    segments: DocumentSegments | None = None  # packed documents; None means one causal sequence per row
    keys: list[str] = field(default_factory=list)  # where each row came from: "source/shard/sample"

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device, non_blocking=True),
            self.labels.to(device, non_blocking=True),
            None if self.position_ids is None else self.position_ids.to(device, non_blocking=True),
            None if self.segments is None else self.segments.to(device),
            self.keys,
        )


def batch_from_chunks(
    chunks: np.ndarray, starts: Sequence[np.ndarray], document_masking: bool, keys: list[str] | None = None
) -> Batch:
    """A batch from packed chunks (rows of seq_len + 1 tokens) and, per row, the offsets where documents begin.

    With document masking, positions restart at every document, attention stays inside it, and the last token of a
    document is not asked to predict the first token of the next one."""
    tokens = torch.from_numpy(chunks.astype(np.int64))
    batch = Batch(input_ids=tokens[:, :-1], labels=tokens[:, 1:].clone(), keys=keys or [])
    if not document_masking:
        return batch
    rows, seq_len = batch.input_ids.shape
    begins = np.zeros((rows, seq_len), dtype=bool)
    begins[:, 0] = True
    for row, offsets in enumerate(starts):
        offsets = np.asarray(offsets, dtype=np.int64)
        begins[row, offsets[offsets < seq_len]] = True
        # The token before a document start ends the previous document: no cross-document target.
        ends = offsets[(offsets > 0) & (offsets <= seq_len)] - 1
        batch.labels[row, ends] = -100
    segment_ids = np.cumsum(begins, axis=1) - 1
    index = np.arange(seq_len)
    segment_start = np.maximum.accumulate(np.where(begins, index, 0), axis=1)
    flat_begins = np.flatnonzero(begins.reshape(-1))
    cu_seqlens = np.append(flat_begins, rows * seq_len).astype(np.int32)
    batch.position_ids = torch.from_numpy(index - segment_start)
    batch.segments = DocumentSegments(torch.from_numpy(segment_ids.astype(np.int32)), torch.from_numpy(cu_seqlens))
    return batch


class TokenStream(Protocol):
    # The tokenizer record of the data's manifests (kind, path, sha256, vocab_size, eos_id), None if unknown.
    tokenizer: dict[str, Any] | None

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def set_weights(self, weights: dict[str, float]) -> None:
        """Mixture weights by source name, from the next sample on."""
        ...

    @staticmethod
    def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
        """Combines every rank's state into one a different number of readers can continue from."""
        ...

    def stats(self) -> dict[str, float]:
        """Counters for the metrics log, e.g. samples drawn per source."""
        ...

    def close(self) -> None: ...


def build_stream(cfg: TrainConfig, rank: int, world_size: int) -> TokenStream:
    """This rank's stream for `data.kind`: webdataset shards mixed by weight, or the synthetic generator."""
    if cfg.data.kind == "synthetic":
        from nopetrain.data.synthetic import SyntheticStream

        return SyntheticStream(cfg, rank, world_size)
    from nopetrain.data.streaming import ShardMixtureStream

    return ShardMixtureStream(cfg, rank, world_size)
