"""Token shards mixed by weight: the stream behind `data.kind=shards`.

Sources are checked at start-up (nopetrain/data/shards.py: the format), each read by its own DataLoader
(nopetrain/data/reader.py: which shards a rank and worker read, in what order, with what resumable state).

Mixture. The training process draws the source of every sample with probability proportional to the current
weights and takes that source's workers' samples in strict rotation, so the stream depends only on the seed and the
state, never on worker timing. Its state is every source's reader state and the mixture's RNG.
"""

from __future__ import annotations

import bisect
import logging
import math
from typing import Any

import numpy as np

from nopetrain.config import ConfigError, TrainConfig
from nopetrain.data import Batch, batch_from_chunks
from nopetrain.data.reader import MIXTURE_ORDER, SourceReader, merge_source, seeded_rng
from nopetrain.data.shards import Source, resolve_source

log = logging.getLogger("nopetrain")


def _shared_tokenizer(sources: dict[str, Source]) -> dict[str, Any] | None:
    """The tokenizer record all manifest sources share; sources tokenized differently cannot be mixed."""
    records = {name: source.tokenizer for name, source in sources.items() if source.tokenizer is not None}
    # A manifest names its tokenizer by hash; a hand-written one may give only a path.
    hashes = {record.get("sha256") or record.get("path") for record in records.values()}
    if len(hashes) > 1:
        raise ConfigError(f"data.sources use different tokenizers: { ({n: r['path'] for n, r in records.items()}) }")
    return next(iter(records.values()), None)


class ShardMixtureStream:
    """This rank's micro-batches from the token shards of cfg.data.sources, mixed by weight (see the module doc)."""

    def __init__(self, cfg: TrainConfig, rank: int, world_size: int) -> None:
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.workers = max(1, cfg.data.num_workers)
        self._readers = {
            name: SourceReader(resolve_source(name, source.path, cfg, world_size), cfg, rank, world_size)
            for name, source in cfg.data.sources.items()
        }
        self._names = list(self._readers)
        self.tokenizer = _shared_tokenizer({name: reader.source for name, reader in self._readers.items()})
        self._weights: dict[str, float] = {}
        self.set_weights({name: source.weight for name, source in cfg.data.sources.items()})
        self._rng = seeded_rng(cfg.seed, MIXTURE_ORDER, rank, 0)

    def set_weights(self, weights: dict[str, float]) -> None:
        """Changes the mixture from the next sample on, without restarting workers; unnamed sources keep theirs."""
        for name, weight in weights.items():
            if name not in self._readers:
                raise ConfigError(f"data.sources.{name}: no such source (the sources are {self._names})")
            if not 0 <= weight < math.inf:
                raise ConfigError(f"data.sources.{name}.weight={weight} must be >= 0 and finite")
        updated = {**self._weights, **{name: float(weight) for name, weight in weights.items()}}
        if sum(updated.values()) <= 0:
            raise ConfigError(f"data.sources weights {updated}: at least one must be positive")
        self._weights = updated
        cumulative = np.cumsum([updated[name] for name in self._names])
        # Dividing by the last entry makes it exactly 1.0, so a draw in [0, 1) never runs past the last source.
        self._cdf = list(cumulative / cumulative[-1])

    def next_batch(self) -> Batch:
        samples = [self._readers[self._draw()].next_sample() for _ in range(self.cfg.micro_batch_size)]
        return batch_from_chunks(
            np.stack([sample.tokens for sample in samples]),
            [sample.starts for sample in samples],
            self.cfg.data.document_masking,
            [f"{sample.source}/{sample.key}" for sample in samples],
        )

    def _draw(self) -> str:
        # A source of weight 0 has an empty interval of the cdf, so it is never drawn.
        return self._names[bisect.bisect_right(self._cdf, self._rng.random())]

    def stats(self) -> dict[str, float]:
        """Per source: samples drawn by this rank, epochs it has completed, and bad shards skipped so far."""
        stats = {}
        for name, reader in self._readers.items():
            stats[f"samples/{name}"] = float(reader.drawn)
            stats[f"epoch/{name}"] = float(reader.progress.epoch)
            stats[f"skipped_shards/{name}"] = float(len(reader.skipped))
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "workers": self.workers,
            "rng": self._rng.bit_generator.state,
            "weights": dict(self._weights),
            "sources": {name: reader.state_dict() for name, reader in self._readers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from a state_dict() of this rank, or from merge_states() of all ranks' (for another layout)."""
        merged = "merged_from" in state
        saved = (state.get("rank"), state.get("world_size"), state.get("workers"))
        if not merged and saved != (self.rank, self.world_size, self.workers):
            raise ConfigError(
                f"the data state of rank {saved[0]} of {saved[1]} with {saved[2]} worker(s) per rank cannot continue "
                f"on rank {self.rank} of {self.world_size} with data.num_workers={self.cfg.data.num_workers}; "
                "combine every rank's state with ShardMixtureStream.merge_states"
            )
        if set(state["sources"]) != set(self._readers):
            raise ConfigError(f"data.sources are {self._names} but the data state holds {sorted(state['sources'])}")
        for name, reader in self._readers.items():
            reader.load_state_dict(state["sources"][name])
        configured = {name: float(source.weight) for name, source in self.cfg.data.sources.items()}
        if state["weights"] != configured:
            log.info(
                "data: mixture weights %s restored from the checkpoint (the config says %s)",
                state["weights"],
                configured,
            )
        self.set_weights(state["weights"])
        if not merged:
            self._rng.bit_generator.state = state["rng"]
            return
        drawn = sum(reader.drawn for reader in self._readers.values())
        self._rng = seeded_rng(self.cfg.seed, MIXTURE_ORDER, self.rank, drawn)
        log.info(
            "data: continuing from positions merged over %s, shared out over %d rank(s) x %d worker(s); samples in "
            "flight at the save are read again and the mixture restarts from (seed, rank %d, %d samples drawn)",
            state["merged_from"],
            self.world_size,
            self.workers,
            self.rank,
            drawn,
        )

    @staticmethod
    def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
        """Combines every rank's state_dict() into one that any world size and worker count can load."""
        world_size, workers = states[0]["world_size"], states[0]["workers"]
        ranks = sorted(state["rank"] for state in states)
        if ranks != list(range(world_size)) or any(state["workers"] != workers for state in states):
            raise ValueError(f"merge_states needs one state per rank of {world_size} with equal workers; got {ranks}")
        return {
            "merged_from": f"{world_size} rank(s) x {workers} worker(s)",
            "weights": dict(states[0]["weights"]),
            "sources": {name: merge_source(states, name) for name in states[0]["sources"]},
        }

    def close(self) -> None:
        """Stops the DataLoader workers; a later next_batch() starts them again from the current position."""
        for reader in self._readers.values():
            reader.close()
