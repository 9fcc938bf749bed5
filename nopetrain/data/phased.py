"""The data of a curriculum: one stream per sequence length its phases use, switched and re-weighted per phase.

Shards are packed at a fixed length, so a phase with its own `seq_len` draws from sources packed at that length;
the sources a phase gives positive weight must match it (the underlying stream checks this when it is built).
Every stream keeps its own exact position, so a phase that returns to an earlier length continues where it was.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from nopetrain.config import TrainConfig
from nopetrain.curriculum import Phase, Schedule
from nopetrain.data import Batch, TokenStream, build_stream


class PhasedStream:
    def __init__(self, cfg: TrainConfig, schedule: Schedule, rank: int, world_size: int) -> None:
        self.streams: dict[int, TokenStream] = {}
        self.sources: dict[int, list[str]] = {}
        for seq_len in sorted({phase.seq_len for phase in schedule.phases}):
            used = {
                name
                for phase in schedule.phases
                if phase.seq_len == seq_len
                for name, weight in phase.weights.items()
                if weight > 0
            }
            # Each stream starts with the weights of its first phase: a source the data's own mixture leaves out
            # (weight 0) may be all a phase at this length draws from.
            first = next(phase for phase in schedule.phases if phase.seq_len == seq_len)
            sources = {
                name: dataclasses.replace(source, weight=first.weights[name])
                for name, source in cfg.data.sources.items()
                if name in used
            }
            self.sources[seq_len] = list(sources)
            sub_cfg = dataclasses.replace(cfg, seq_len=seq_len, data=dataclasses.replace(cfg.data, sources=sources))
            self.streams[seq_len] = build_stream(sub_cfg, rank, world_size)
        self.current = self.streams[schedule.phases[0].seq_len]
        self.tokenizer = next((s.tokenizer for s in self.streams.values() if s.tokenizer is not None), None)

    def set_phase(self, phase: Phase) -> None:
        """Draws from the phase's sequence length with its weights from the next batch on."""
        self.current = self.streams[phase.seq_len]
        if self.sources[phase.seq_len]:
            self.current.set_weights({name: phase.weights[name] for name in self.sources[phase.seq_len]})

    def next_batch(self) -> Batch:
        return self.current.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {seq_len: stream.state_dict() for seq_len, stream in self.streams.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for seq_len, stream in self.streams.items():
            stream.load_state_dict(state[seq_len])

    def merge_states(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            seq_len: stream.merge_states([state[seq_len] for state in states])
            for seq_len, stream in self.streams.items()
        }

    def stats(self) -> dict[str, float]:
        merged: dict[str, float] = {}
        for stream in self.streams.values():
            for key, value in stream.stats().items():
                merged[key] = merged.get(key, 0.0) + value
        return merged

    def close(self) -> None:
        for stream in self.streams.values():
            stream.close()
