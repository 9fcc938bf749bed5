"""One source's reader: which shards each rank and DataLoader worker reads, in what order, and the resumable
record of how far the training process has taken them.

Splitting. A run has world_size x max(1, num_workers) readers, the slots; worker w of rank r is slot r * workers + w.
For each source and epoch the shard order is a permutation seeded by (seed, source, epoch), the same on every rank,
and slot s reads the shards at positions p with p % slots == s, in order, then goes on with the next epoch: every
source is resampled forever. A shard is read whole into memory (nopetrain/data/shards.py) and its samples are
visited in a permutation seeded by (seed, source, epoch, position): the shard is the shuffle buffer, and every sample
has an exact place, (epoch, position, index in that permutation).

Resume. The state records, per source, how many samples of each shard position the training process has taken
(not what the workers had prefetched: those are read again). With the same world size and workers per rank the
resumed stream continues exactly; with other ones `merge_source` combines every rank's state and the new slots share
out what is left of each epoch.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections import deque
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nopetrain.config import ConfigError, TrainConfig
from nopetrain.data.shards import ShardError, Source, read_shard
from nopetrain.data_pipelines.errors import DataError
from nopetrain.ownership import die_with_parent
from nopetrain.preemption import ignore_preemption_signals, preemption_signals_blocked

log = logging.getLogger("nopetrain")

# A shard position read to its end or skipped, in the per-position counts of the state.
FINISHED = -1
# Samples each worker keeps ready: enough to cover the pause while it reads its next shard.
PREFETCH = 64
# Seeding purposes: the tag keeps the generators of different purposes apart for equal other inputs.
SHARD_ORDER, SAMPLE_ORDER, MIXTURE_ORDER = 1, 2, 3


def seeded_rng(seed: int, purpose: int, *parts: int | str) -> np.random.Generator:
    """A generator that depends only on its inputs; names enter through a stable hash (Python's hash() is salted)."""
    words = [seed % 2**64, purpose]
    for part in parts:
        words.append(
            int.from_bytes(hashlib.blake2b(part.encode(), digest_size=8).digest()) if isinstance(part, str) else part
        )
    return np.random.Generator(np.random.PCG64(words))


def owned_positions(shards: int, rank: int, world_size: int, workers: int) -> list[int]:
    """The shard positions (of every epoch's order) that rank reads: those of its slots."""
    slots = world_size * workers
    return [position for position in range(shards) if position % slots // workers == rank]


# ---------------------------------------------------------------------------------------------------------------------
# Positions and the worker side.


def _init_worker(rank_pid: int, worker_id: int) -> None:
    """A DataLoader worker ignores the preemption signals (its rank shuts it down) and dies with its rank whatever
    kills the rank: after a SIGKILL nothing shuts it down, and torch's watchdog looks only while the worker waits for
    work, so workers blocked on a full queue outlived their rank with their shards in memory. The iterator that forks
    them lives in the training thread, whose exit is the process's."""
    ignore_preemption_signals(worker_id)
    die_with_parent(rank_pid)


class _Progress:
    """Which samples of one source a rank has taken. Every epoch before `epoch` is done for the positions the rank
    owns; rows[i][p] is the number of samples taken from position p of epoch `epoch + i`, or FINISHED once that
    shard is done. Rows cover all positions so that the states of all ranks merge by position."""

    def __init__(self, shards: int, owned: list[int], epoch: int = 0, rows: list[list[int]] | None = None) -> None:
        self.shards, self.owned = shards, owned
        self.epoch = epoch
        self.rows = [list(row) for row in rows or []]
        self._advance()

    def copy(self) -> _Progress:
        return _Progress(self.shards, self.owned, self.epoch, self.rows)

    def taken(self, epoch: int, position: int) -> int:
        index = epoch - self.epoch
        if index < 0:
            return FINISHED
        return self.rows[index][position] if index < len(self.rows) else 0

    def record(self, epoch: int, position: int, taken: int) -> None:
        index = epoch - self.epoch
        self.rows.extend([0] * self.shards for _ in range(index + 1 - len(self.rows)))
        self.rows[index][position] = taken
        if taken == FINISHED:  # only then can an epoch end; checking once per shard keeps this cheap
            self._advance()

    def _advance(self) -> None:
        while self.rows and all(self.rows[0][position] == FINISHED for position in self.owned):
            self.rows.pop(0)
            self.epoch += 1


class _Sample(NamedTuple):
    source: str
    worker: int
    epoch: int
    position: int
    index: int  # in the shard's visiting order
    count: int  # samples in the shard
    key: str
    tokens: np.ndarray
    starts: np.ndarray


class _BadShard(NamedTuple):
    """Sent by a worker in place of a shard it cannot use; the training process raises or logs and skips."""

    epoch: int
    position: int
    shard: int
    url: str
    reason: str


def _as_is(item: _Sample | _BadShard) -> _Sample | _BadShard:
    # Items cross from the workers pickled, numpy arrays included: cheaper than shared-memory tensors at this size.
    return item


class _ShardDataset(IterableDataset):
    """One source's samples for one rank: worker w of the DataLoader (or the training process when it has no
    workers) yields slot rank * workers + w's samples, and a _BadShard for each shard it cannot use, forever."""

    def __init__(
        self, source: Source, vocab_size: int, seed: int, rank: int, world_size: int, workers: int, start: _Progress
    ) -> None:
        self.source, self.vocab_size, self.seed = source, vocab_size, seed
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.start = start

    def __iter__(self) -> Iterator[_Sample | _BadShard]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        slots, slot = self.world_size * self.workers, self.rank * self.workers + worker
        name, shards = self.source.name, len(self.source.urls)
        epoch = self.start.epoch
        while True:
            order = seeded_rng(self.seed, SHARD_ORDER, name, epoch).permutation(shards)
            for position in range(slot, shards, slots):
                taken = self.start.taken(epoch, position)
                if taken == FINISHED:
                    continue
                shard = int(order[position])
                try:
                    samples = read_shard(self.source, shard, self.vocab_size)
                except ShardError as error:
                    yield _BadShard(epoch, position, shard, self.source.urls[shard], str(error))
                    continue
                visit = seeded_rng(self.seed, SAMPLE_ORDER, name, epoch, position).permutation(len(samples))
                for index in range(taken, len(samples)):
                    key, tokens, starts = samples[visit[index]]
                    yield _Sample(name, worker, epoch, position, index, len(samples), key, tokens, starts)
            epoch += 1


# ---------------------------------------------------------------------------------------------------------------------
# The training process's side.


class SourceReader:
    """One source in the training process: its DataLoader (started on first use), the samples that arrived ahead
    of their turn, and what has been taken."""

    def __init__(self, source: Source, cfg: TrainConfig, rank: int, world_size: int) -> None:
        self.source, self.cfg, self.rank, self.world_size = source, cfg, rank, world_size
        self.workers = max(1, cfg.data.num_workers)
        self.progress = _Progress(len(source.urls), owned_positions(len(source.urls), rank, world_size, self.workers))
        self.drawn = 0
        self.skipped: set[int] = set()
        self._iterator: Iterator[_Sample | _BadShard] | None = None
        self._waiting: list[deque[_Sample]] = [deque() for _ in range(self.workers)]

    def _start(self) -> Iterator[_Sample | _BadShard]:
        dataset = _ShardDataset(
            self.source,
            self.cfg.model.vocab_size,
            self.cfg.seed,
            self.rank,
            self.world_size,
            self.workers,
            self.progress.copy(),
        )
        workers = self.cfg.data.num_workers
        # The iterator never ends, so its workers live as long as it does (persistent_workers would change nothing).
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            collate_fn=_as_is,
            prefetch_factor=PREFETCH if workers else None,
            worker_init_fn=functools.partial(_init_worker, os.getpid()),
        )
        with preemption_signals_blocked():  # the workers start (fork) here
            return iter(loader)

    def next_sample(self) -> _Sample:
        if self._iterator is None:
            self._iterator = self._start()
        # Workers take turns by the count of samples drawn, which the state restores; a sample that arrives before
        # its worker's turn waits here (the DataLoader's own rotation restarts at worker 0 after a resume).
        turn = self.drawn % self.workers
        while not self._waiting[turn]:
            item = next(self._iterator)
            if isinstance(item, _BadShard):
                self._bad_shard(item)
            else:
                self._waiting[item.worker].append(item)
        sample = self._waiting[turn].popleft()
        self.progress.record(
            sample.epoch, sample.position, FINISHED if sample.index + 1 == sample.count else sample.index + 1
        )
        self.drawn += 1
        return sample

    def _bad_shard(self, bad: _BadShard) -> None:
        message = f"data.sources.{self.source.name}: shard {bad.url}: {bad.reason}"
        if self.cfg.data.on_error == "raise":
            raise DataError(f"{message} (set data.on_error=skip to skip bad shards)")
        if bad.shard not in self.skipped:
            self.skipped.add(bad.shard)
            log.warning("%s; skipping the shard (data.on_error=skip)", message)
        self.progress.record(bad.epoch, bad.position, FINISHED)
        if len(self.skipped) == len(self.source.urls):
            raise DataError(f"data.sources.{self.source.name}: all {len(self.skipped)} shards are bad; last: {message}")

    def state_dict(self) -> dict[str, Any]:
        return {
            "shards": self.progress.shards,
            "epoch": self.progress.epoch,
            "rows": [list(row) for row in self.progress.rows],
            "drawn": self.drawn,
            "skipped": sorted(self.skipped),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["shards"] != self.progress.shards:
            raise ConfigError(
                f"data.sources.{self.source.name} has {self.progress.shards} shards but the data state was saved "
                f"over {state['shards']}; a re-tokenized source cannot continue from the old position"
            )
        self.close()  # workers already running read from the old position
        self.progress = _Progress(self.progress.shards, self.progress.owned, state["epoch"], state["rows"])
        self.drawn = int(state["drawn"])
        self.skipped = set(state["skipped"])

    def close(self) -> None:
        # Dropping the DataLoader iterator shuts its workers down.
        self._iterator = None
        self._waiting = [deque() for _ in range(self.workers)]


def merge_source(states: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """One source's positions over all ranks: per position the largest count, FINISHED where any rank finished."""
    parts = [state["sources"][name] for state in states]
    shards = parts[0]["shards"]
    first = min(part["epoch"] for part in parts)
    last = max(part["epoch"] + len(part["rows"]) for part in parts)
    rows = [[0] * shards for _ in range(last - first)]
    for state in states:
        part = state["sources"][name]
        owned = set(owned_positions(shards, state["rank"], state["world_size"], state["workers"]))
        for epoch, row in enumerate(rows, start=first):
            if epoch < part["epoch"]:  # done for the positions this rank owned
                theirs = [FINISHED if position in owned else 0 for position in range(shards)]
            elif epoch - part["epoch"] < len(part["rows"]):
                theirs = part["rows"][epoch - part["epoch"]]
            else:
                continue
            for position, taken in enumerate(theirs):
                row[position] = FINISHED if FINISHED in (row[position], taken) else max(row[position], taken)
    while rows and all(taken == FINISHED for taken in rows[0]):
        rows.pop(0)
        first += 1
    return {
        "shards": shards,
        "epoch": first,
        "rows": rows,
        "drawn": sum(part["drawn"] for part in parts),
        "skipped": sorted({shard for part in parts for shard in part["skipped"]}),
    }
