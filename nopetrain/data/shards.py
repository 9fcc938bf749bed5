"""The shard format as the training side reads it: what a source is, and how a shard is checked.

A source is a directory (or URL) holding the manifest.json and webdataset tars written by
`nopetrain-data tokenize` (data_pipelines/shards.py writes them), or a brace pattern of tar URLs
("::" joins several patterns, as in webdataset); shards open with webdataset's gopen, so `pipe:` and the other URLs
it knows work. Each sample holds KEY.tokens.npy (seq_len + 1 tokens) and KEY.starts.npy (int32 offsets where
documents begin).

Bad data. A shard that cannot be opened, is cut short or corrupt, holds no samples, disagrees with its manifest
(samples, tokens, sha256), or has a sample with a missing member, the wrong length or dtype, or a token id >=
model.vocab_size raises ShardError; the reader turns it into a one-line DataError (data.on_error=raise) or skips the
shard whole (data.on_error=skip): a shard is checked entirely before any of its samples is used.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import numpy as np
from braceexpand import braceexpand
from webdataset.gopen import gopen

from nopetrain.config import ConfigError, TrainConfig
from nopetrain.data_pipelines.errors import DataError
from nopetrain.exits import one_line

FORMAT = "nopetrain-tokens-v1"
DTYPES = ("uint16", "uint32")
_TAR_BLOCK = 512
# webdataset's split of a member name into sample key and extension (from the first dot of the file name).
_MEMBER = re.compile(r"((?:.*/|)[^.]+)[.]([^/]*)")


class ShardError(Exception):
    """Raised while reading a shard; the worker turns it into a _BadShard marker."""


# ---------------------------------------------------------------------------------------------------------------------
# Sources: what the config names, checked at start-up.


@dataclass(frozen=True)
class Source:
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


def from_manifest(name: str, path: str, key: str, vocab_size: int) -> Source:
    url = f"{path.rstrip('/')}/manifest.json"
    try:
        with gopen(url, "rb") as stream:
            manifest = json.loads(stream.read())
    except FileNotFoundError:
        raise ConfigError(
            f"{key}: no manifest.json there; write the source with `nopetrain-data tokenize` "
            "or give a pattern of .tar shards"
        ) from None
    except (OSError, ValueError) as error:
        raise ConfigError(f"{key}: cannot read {url}: {one_line(error)}") from None
    try:
        shards = manifest["shards"]
        source = Source(
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


def _from_pattern(name: str, path: str, key: str) -> Source:
    urls = tuple(url for pattern in path.split("::") for url in braceexpand(pattern))
    if all(not urlparse(url).scheme and not os.path.exists(url) for url in urls):
        raise ConfigError(f"{key}: no shards matched")
    # Without a manifest, seq_len and dtype come from the first sample of the first shard (which is read whole).
    try:
        samples = _tar_samples(_fetch(urls[0]))
        if not samples:
            raise ShardError("it holds no samples")
        sample_key, members = next(iter(samples.items()))
        tokens = _npy(members, sample_key, "tokens.npy")
    except ShardError as error:
        raise ConfigError(f"{key}: cannot learn seq_len and dtype from its first shard {urls[0]}: {error}") from None
    if tokens.ndim != 1 or tokens.dtype.name not in DTYPES:
        raise ConfigError(
            f"{key}: sample {sample_key} of {urls[0]} holds {tokens.dtype}{list(tokens.shape)} tokens, not 1-D {DTYPES}"
        )
    return Source(name, urls, seq_len=len(tokens) - 1, dtype=tokens.dtype.name)


def resolve_source(name: str, path: str, cfg: TrainConfig, world_size: int) -> Source:
    key = f"data.sources.{name}.path={path}"
    source = _from_pattern(name, path, key) if ".tar" in path else from_manifest(name, path, key, cfg.model.vocab_size)
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
        raise ShardError(f"cannot read it: {one_line(error)}") from None


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
        raise ShardError(f"not a readable tar ({one_line(error)})") from None
    # tarfile stops quietly at a bad header or at the end of the data; a whole archive ends with a zero block.
    if data[end : end + _TAR_BLOCK] != bytes(_TAR_BLOCK):
        after = f" after sample {next(reversed(samples))}" if samples else ""
        raise ShardError(f"the tar is cut short or corrupt at byte {end}{after}")
    return samples


def _npy(members: dict[str, memoryview], key: str, extension: str) -> np.ndarray:
    if extension not in members:
        raise ShardError(f"sample {key} has no {extension} member")
    try:
        return np.load(io.BytesIO(members[extension]), allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise ShardError(f"sample {key}: {extension} is not a .npy array ({one_line(error)})") from None


def read_shard(source: Source, shard: int, vocab_size: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(key, tokens, starts) of every sample of a shard, each checked; raises ShardError naming the problem."""
    data = _fetch(source.urls[shard])
    samples = []
    for key, members in _tar_samples(data).items():
        tokens, starts = _npy(members, key, "tokens.npy"), _npy(members, key, "starts.npy")
        if tokens.dtype != source.dtype or tokens.shape != (source.seq_len + 1,):
            raise ShardError(
                f"sample {key}: tokens are {tokens.dtype}{list(tokens.shape)}, expected "
                f"{source.dtype}[{source.seq_len + 1}]"
            )
        if tokens.max() >= vocab_size:
            raise ShardError(f"sample {key}: token id {int(tokens.max())} >= model.vocab_size={vocab_size}")
        if starts.dtype != np.int32 or starts.ndim != 1:
            raise ShardError(f"sample {key}: starts are {starts.dtype}{list(starts.shape)}, expected 1-D int32")
        samples.append((key, tokens, starts))
    if not samples:
        raise ShardError("it holds no samples")
    if source.samples is not None and len(samples) != source.samples[shard]:
        raise ShardError(f"it holds {len(samples)} samples, the manifest says {source.samples[shard]}")
    held = sum(len(tokens) for _, tokens, _ in samples)
    if source.tokens is not None and held != source.tokens[shard]:
        raise ShardError(f"it holds {held} tokens, the manifest says {source.tokens[shard]}")
    if source.sha256 is not None and hashlib.sha256(data).hexdigest() != source.sha256[shard]:
        raise ShardError("its sha256 differs from the manifest's")
    return samples


def read_documents(path: str, vocab_size: int, key: str | None = None) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The documents (each with its EOS) of the source with a manifest at `path`, in input order, and the
    manifest's tokenizer record, for evaluation. The samples of the shards, in manifest and key order, are the
    packed stream cut into consecutive pieces, so a document is the tokens from one start to the next; the last one
    is the beginning of a document (the stream's remainder was dropped when it was packed). Raises ConfigError or
    DataError naming `key` (the config key that named `path`) or, without one, `path`."""
    key = key or f"heldout source {path}"
    source = from_manifest(path, path, key, vocab_size)
    pieces, starts = [], []
    for shard in range(len(source.urls)):
        try:
            samples = sorted(read_shard(source, shard, vocab_size), key=lambda sample: sample[0])
        except ShardError as error:
            raise DataError(f"{key}: shard {source.urls[shard]}: {error}") from None
        for _, tokens, offsets in samples:
            starts.append(offsets.astype(np.int64) + len(pieces) * (source.seq_len + 1))
            pieces.append(tokens)
    stream = np.concatenate(pieces).astype(np.int64)
    bounds = [*np.concatenate(starts).tolist(), len(stream)]
    documents = [stream[begin:end] for begin, end in itertools.pairwise(bounds)]
    return documents, dict(source.tokenizer or {})
