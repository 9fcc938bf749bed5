"""Token shards mixed by weight: the stream behind `data.kind=shards`.

A source is a directory (or URL) holding the manifest.json and webdataset tars written by
`python -m nopetrain.data_pipelines tokenize`, or a brace pattern of tar URLs ("::" joins several patterns, as in
webdataset); shards open with webdataset's gopen, so `pipe:` and the other URLs it knows work. Each sample holds
KEY.tokens.npy (seq_len + 1 tokens) and KEY.starts.npy (int32 offsets where documents begin).

Splitting. A run has world_size x max(1, num_workers) readers, the slots; worker w of rank r is slot r * workers + w.
For each source and epoch the shard order is a permutation seeded by (seed, source, epoch), the same on every rank,
and slot s reads the shards at positions p with p % slots == s, in order, then goes on with the next epoch: every
source is resampled forever. A shard is read whole into memory and its samples are visited in a permutation seeded
by (seed, source, epoch, position): the shard is the shuffle buffer, and every sample has an exact place, (epoch,
position, index in that permutation).

Mixture. Each source has its own DataLoader. The training process draws the source of every sample with
probability proportional to the current weights and takes that source's workers' samples in strict rotation, so
the stream depends only on the seed and the state, never on worker timing.

Resume. The state records, per source, how many samples of each shard position the training process has taken
(not what the workers had prefetched: those are read again). With the same world size and workers per rank the
resumed stream continues exactly; with other ones `merge_states` combines every rank's state and the new slots share
out what is left of each epoch.

Bad data. A shard that cannot be opened, is cut short or corrupt, holds no samples, disagrees with its manifest, or
has a sample with a missing member, the wrong length or dtype, or a token id >= model.vocab_size stops the run with
a one-line DataError (data.on_error=raise), or is skipped whole (data.on_error=skip): a shard is checked entirely
before any of its samples is used, so a bad shard contributes nothing.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import tarfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlparse

import numpy as np
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen

from nopetrain.config import ConfigError, TrainConfig
from nopetrain.data import Batch, batch_from_chunks
from nopetrain.data_pipelines.errors import DataError
from nopetrain.exits import one_line
from nopetrain.preemption import ignore_preemption_signals, preemption_signals_blocked

log = logging.getLogger("nopetrain")

FORMAT = "nopetrain-tokens-v1"
DTYPES = ("uint16", "uint32")
# A shard position read to its end or skipped, in the per-position counts of the state.
FINISHED = -1
# Samples each worker keeps ready: enough to cover the pause while it reads its next shard.
PREFETCH = 64
_TAR_BLOCK = 512
# webdataset's split of a member name into sample key and extension (from the first dot of the file name).
_MEMBER = re.compile(r"((?:.*/|)[^.]+)[.]([^/]*)")
# Seeding purposes: the tag keeps the generators of different purposes apart for equal other inputs.
_SHARD_ORDER, _SAMPLE_ORDER, _MIXTURE = 1, 2, 3


class _ShardError(Exception):
    """Raised while reading a shard; the worker turns it into a _BadShard marker."""


def _rng(seed: int, purpose: int, *parts: int | str) -> np.random.Generator:
    """A generator that depends only on its inputs; names enter through a stable hash (Python's hash() is salted)."""
    words = [seed % 2**64, purpose]
    for part in parts:
        words.append(
            int.from_bytes(hashlib.blake2b(part.encode(), digest_size=8).digest()) if isinstance(part, str) else part
        )
    return np.random.Generator(np.random.PCG64(words))


def _owned_positions(shards: int, rank: int, world_size: int, workers: int) -> list[int]:
    """The shard positions (of every epoch's order) that rank reads: those of its slots."""
    slots = world_size * workers
    return [position for position in range(shards) if position % slots // workers == rank]


# ---------------------------------------------------------------------------------------------------------------------
# Sources: what the config names, checked at start-up.


@dataclass(frozen=True)
class _Source:
    """One source's shards; per-shard sample counts and sha256 come from the manifest (None without one)."""

    name: str
    urls: tuple[str, ...]
    seq_len: int
    dtype: str
    samples: tuple[int, ...] | None = None
    tokens: tuple[int, ...] | None = None
    sha256: tuple[str, ...] | None = None
    # The manifest's tokenizer record (kind, path, sha256, vocab_size, eos_id); None without a manifest.
    tokenizer: dict[str, Any] | None = None


def _tokenizer_record(record: dict[str, Any], path: str) -> dict[str, Any]:
    """The manifest's tokenizer record with its path resolved: relative to the manifest's folder as `tokenize`
    writes it, or (manifests written before 2026-12-02) relative to the working directory it ran in."""
    record = dict(record)
    if "path" not in record:  # a hand-written manifest may name its tokenizer by hash only
        return record
    local = not urlparse(path).scheme and not os.path.isabs(record["path"])
    beside = os.path.normpath(os.path.join(path, record["path"]))
    if local and (os.path.isfile(beside) or not os.path.isfile(record["path"])):
        record["path"] = beside
    return record


def _from_manifest(name: str, path: str, key: str, vocab_size: int) -> _Source:
    url = f"{path.rstrip('/')}/manifest.json"
    try:
        with gopen(url, "rb") as stream:
            manifest = json.loads(stream.read())
    except FileNotFoundError:
        raise ConfigError(
            f"{key}: no manifest.json there; write the source with `python -m nopetrain.data_pipelines tokenize` "
            "or give a pattern of .tar shards"
        ) from None
    except (OSError, ValueError) as error:
        raise ConfigError(f"{key}: cannot read {url}: {one_line(error)}") from None
    try:
        shards = manifest["shards"]
        source = _Source(
            name=name,
            urls=tuple(f"{path.rstrip('/')}/{shard['path']}" for shard in shards),
            seq_len=int(manifest["seq_len"]),
            dtype=manifest["dtype"],
            samples=tuple(int(shard["samples"]) for shard in shards),
            tokens=tuple(int(shard["tokens"]) for shard in shards),
            sha256=tuple(shard["sha256"] for shard in shards),
            tokenizer=_tokenizer_record(manifest["tokenizer"], path),
        )
        tokenizer_vocab = int(manifest["tokenizer"]["vocab_size"])
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"{key}: {url} lacks {one_line(error)}; is it a {FORMAT} manifest?") from None
    if manifest.get("format") != FORMAT or source.dtype not in DTYPES:
        raise ConfigError(f"{key}: {url} is not a {FORMAT} manifest with dtype in {DTYPES}")
    if not sum(source.samples):
        raise ConfigError(f"{key}: the source is empty: {url} lists {len(shards)} shard(s) and 0 samples")
    if tokenizer_vocab > vocab_size:
        raise ConfigError(
            f"model.vocab_size={vocab_size} is smaller than vocab_size={tokenizer_vocab} of the tokenizer of {key}"
        )
    return source


def _from_pattern(name: str, path: str, key: str) -> _Source:
    urls = tuple(url for pattern in path.split("::") for url in braceexpand(pattern))
    if all(not urlparse(url).scheme and not os.path.exists(url) for url in urls):
        raise ConfigError(f"{key}: no shards matched")
    # Without a manifest, seq_len and dtype come from the first sample of the first shard (which is read whole).
    try:
        samples = _tar_samples(_fetch(urls[0]))
        if not samples:
            raise _ShardError("it holds no samples")
        sample_key, members = next(iter(samples.items()))
        tokens = _npy(members, sample_key, "tokens.npy")
    except _ShardError as error:
        raise ConfigError(f"{key}: cannot learn seq_len and dtype from its first shard {urls[0]}: {error}") from None
    if tokens.ndim != 1 or tokens.dtype.name not in DTYPES:
        raise ConfigError(
            f"{key}: sample {sample_key} of {urls[0]} holds {tokens.dtype}{list(tokens.shape)} tokens, not 1-D {DTYPES}"
        )
    return _Source(name, urls, seq_len=len(tokens) - 1, dtype=tokens.dtype.name)


def _resolve(name: str, path: str, cfg: TrainConfig, world_size: int) -> _Source:
    key = f"data.sources.{name}.path={path}"
    source = _from_pattern(name, path, key) if ".tar" in path else _from_manifest(name, path, key, cfg.model.vocab_size)
    if source.seq_len != cfg.seq_len:
        raise ConfigError(f"seq_len={cfg.seq_len} but {key} holds samples of seq_len={source.seq_len}")
    slots = world_size * max(1, cfg.data.num_workers)
    if len(source.urls) < slots:
        raise ConfigError(
            f"{key} has {len(source.urls)} shard(s), fewer than the {slots} readers (world size {world_size} x "
            f"data.num_workers={cfg.data.num_workers}); re-tokenize it with a smaller --shard-samples"
        )
    return source


# ---------------------------------------------------------------------------------------------------------------------
# Reading one shard, in a worker.


def _fetch(url: str) -> bytes:
    try:
        with gopen(url, "rb") as stream:
            return stream.read()
    except (OSError, ValueError) as error:
        raise _ShardError(f"cannot read it: {one_line(error)}") from None


def _tar_samples(data: bytes) -> dict[str, dict[str, memoryview]]:
    """The members of a tar held in memory, grouped by sample key in archive order."""
    view = memoryview(data)
    samples: dict[str, dict[str, memoryview]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                match = _MEMBER.fullmatch(member.name)
                if member.isfile() and match:
                    start = member.offset_data
                    samples.setdefault(match[1], {})[match[2]] = view[start : start + member.size]
            end = tar.offset
    except tarfile.TarError as error:
        raise _ShardError(f"not a readable tar ({one_line(error)})") from None
    # tarfile stops quietly at a bad header or at the end of the data; a whole archive ends with a zero block.
    if data[end : end + _TAR_BLOCK] != bytes(_TAR_BLOCK):
        after = f" after sample {next(reversed(samples))}" if samples else ""
        raise _ShardError(f"the tar is cut short or corrupt at byte {end}{after}")
    return samples


def _npy(members: dict[str, memoryview], key: str, extension: str) -> np.ndarray:
    if extension not in members:
        raise _ShardError(f"sample {key} has no {extension} member")
    try:
        return np.load(io.BytesIO(members[extension]), allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise _ShardError(f"sample {key}: {extension} is not a .npy array ({one_line(error)})") from None


def _read_shard(source: _Source, shard: int, vocab_size: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(key, tokens, starts) of every sample of a shard, each checked; raises _ShardError naming the problem."""
    data = _fetch(source.urls[shard])
    samples = []
    for key, members in _tar_samples(data).items():
        tokens, starts = _npy(members, key, "tokens.npy"), _npy(members, key, "starts.npy")
        if tokens.dtype != source.dtype or tokens.shape != (source.seq_len + 1,):
            raise _ShardError(
                f"sample {key}: tokens are {tokens.dtype}{list(tokens.shape)}, expected "
                f"{source.dtype}[{source.seq_len + 1}]"
            )
        if tokens.max() >= vocab_size:
            raise _ShardError(f"sample {key}: token id {int(tokens.max())} >= model.vocab_size={vocab_size}")
        if starts.dtype != np.int32 or starts.ndim != 1:
            raise _ShardError(f"sample {key}: starts are {starts.dtype}{list(starts.shape)}, expected 1-D int32")
        samples.append((key, tokens, starts))
    if not samples:
        raise _ShardError("it holds no samples")
    if source.samples is not None and len(samples) != source.samples[shard]:
        raise _ShardError(f"it holds {len(samples)} samples, the manifest says {source.samples[shard]}")
    held = sum(len(tokens) for _, tokens, _ in samples)
    if source.tokens is not None and held != source.tokens[shard]:
        raise _ShardError(f"it holds {held} tokens, the manifest says {source.tokens[shard]}")
    if source.sha256 is not None and hashlib.sha256(data).hexdigest() != source.sha256[shard]:
        raise _ShardError("its sha256 differs from the manifest's")
    return samples


# ---------------------------------------------------------------------------------------------------------------------
# Positions and the worker side.


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
        self, source: _Source, vocab_size: int, seed: int, rank: int, world_size: int, workers: int, start: _Progress
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
            order = _rng(self.seed, _SHARD_ORDER, name, epoch).permutation(shards)
            for position in range(slot, shards, slots):
                taken = self.start.taken(epoch, position)
                if taken == FINISHED:
                    continue
                shard = int(order[position])
                try:
                    samples = _read_shard(self.source, shard, self.vocab_size)
                except _ShardError as error:
                    yield _BadShard(epoch, position, shard, self.source.urls[shard], str(error))
                    continue
                visit = _rng(self.seed, _SAMPLE_ORDER, name, epoch, position).permutation(len(samples))
                for index in range(taken, len(samples)):
                    key, tokens, starts = samples[visit[index]]
                    yield _Sample(name, worker, epoch, position, index, len(samples), key, tokens, starts)
            epoch += 1


# ---------------------------------------------------------------------------------------------------------------------
# The training process's side.


class _SourceReader:
    """One source in the training process: its DataLoader (started on first use), the samples that arrived ahead
    of their turn, and what has been taken."""

    def __init__(self, source: _Source, cfg: TrainConfig, rank: int, world_size: int) -> None:
        self.source, self.cfg, self.rank, self.world_size = source, cfg, rank, world_size
        self.workers = max(1, cfg.data.num_workers)
        self.progress = _Progress(len(source.urls), _owned_positions(len(source.urls), rank, world_size, self.workers))
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
            worker_init_fn=ignore_preemption_signals,
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


def _merge_source(states: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """One source's positions over all ranks: per position the largest count, FINISHED where any rank finished."""
    parts = [state["sources"][name] for state in states]
    shards = parts[0]["shards"]
    first = min(part["epoch"] for part in parts)
    last = max(part["epoch"] + len(part["rows"]) for part in parts)
    rows = [[0] * shards for _ in range(last - first)]
    for state in states:
        part = state["sources"][name]
        owned = set(_owned_positions(shards, state["rank"], state["world_size"], state["workers"]))
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


def _shared_tokenizer(sources: dict[str, _Source]) -> dict[str, Any] | None:
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
            name: _SourceReader(_resolve(name, source.path, cfg, world_size), cfg, rank, world_size)
            for name, source in cfg.data.sources.items()
        }
        self._names = list(self._readers)
        self.tokenizer = _shared_tokenizer({name: reader.source for name, reader in self._readers.items()})
        self._weights: dict[str, float] = {}
        self.set_weights({name: source.weight for name, source in cfg.data.sources.items()})
        self._rng = _rng(cfg.seed, _MIXTURE, rank, 0)

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
        self._rng = _rng(self.cfg.seed, _MIXTURE, self.rank, drawn)
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
            "sources": {name: _merge_source(states, name) for name in states[0]["sources"]},
        }

    def close(self) -> None:
        """Stops the DataLoader workers; a later next_batch() starts them again from the current position."""
        for reader in self._readers.values():
            reader.close()


def read_documents(path: str, vocab_size: int, key: str | None = None) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The documents (each with its EOS) of the source with a manifest at `path`, in input order, and the
    manifest's tokenizer record, for evaluation. The samples of the shards, in manifest and key order, are the
    packed stream cut into consecutive pieces, so a document is the tokens from one start to the next; the last one
    is the beginning of a document (the stream's remainder was dropped when it was packed). Raises ConfigError or
    DataError naming `key` (the config key that named `path`) or, without one, `path`."""
    key = key or f"heldout source {path}"
    source = _from_manifest(path, path, key, vocab_size)
    pieces, starts = [], []
    for shard in range(len(source.urls)):
        try:
            samples = sorted(_read_shard(source, shard, vocab_size), key=lambda sample: sample[0])
        except _ShardError as error:
            raise DataError(f"{key}: shard {source.urls[shard]}: {error}") from None
        for _, tokens, offsets in samples:
            starts.append(offsets.astype(np.int64) + len(pieces) * (source.seq_len + 1))
            pieces.append(tokens)
    stream = np.concatenate(pieces).astype(np.int64)
    bounds = [*np.concatenate(starts).tolist(), len(stream)]
    documents = [stream[begin:end] for begin, end in itertools.pairwise(bounds)]
    return documents, dict(source.tokenizer or {})
