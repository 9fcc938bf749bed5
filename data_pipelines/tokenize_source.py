"""`tokenize`: documents to tokens to fixed-length samples in webdataset shards, with a manifest.

Each document's tokens are followed by EOS and the documents are concatenated, in input order, into one stream
that is cut into samples of exactly seq_len + 1 tokens (inputs and their shifted labels); the last partial sample
is dropped and counted. A source whose documents must be seen whole (`whole_documents`, e.g. look-ups whose
question needs its needles) pads a sample rather than split a document across two. The layout is a contract that
the streaming loader reads:

    DIR/SOURCE/manifest.json
    DIR/SOURCE/SOURCE-000000.tar, SOURCE-000001.tar, ...

Sample keys are f"{shard:06d}-{sample:07d}", with members KEY.tokens.npy (the seq_len + 1 tokens, uint16 when the
vocabulary fits, else uint32) and KEY.starts.npy (int32 offsets where documents begin, see packing.Packer). The
shards are byte-identical whatever the worker count: workers encode batches of documents and the results are
taken back in order.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nopetrain.atomic import staged_directory, write_bytes

from .encoders import Encoder, TokenizerInfo, describe, load
from .errors import DataError
from .inputs import iter_documents, resolve_inputs
from .packing import Packer
from .shards import ShardWriter

FORMAT = "nopetrain-tokens-v1"
DEFAULT_SHARD_SAMPLES = 2048
# Text per work item: enough to make the hand-over to a worker cheap, little enough to keep all workers busy.
BATCH_CHARS = 1 << 20
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")

Encoded = tuple[np.ndarray, np.ndarray, int]  # tokens with EOS after each document, document lengths, text bytes


def encode_documents(encoder: Encoder, texts: list[str], eos_id: int) -> Encoded:
    """Encodes a batch of documents into one uint32 array, each document followed by EOS."""
    ids = encoder.encode(texts)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum()))
    tokens = np.insert(flat, np.cumsum(lengths), eos_id)
    return tokens, lengths + 1, sum(len(text.encode("utf-8")) for text in texts)


_worker_encoder: Encoder | None = None


def _init_worker(info: TokenizerInfo) -> None:
    global _worker_encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the workers are the parallelism
    _worker_encoder = load(info)


def _encode_in_worker(texts: list[str], eos_id: int) -> Encoded:
    assert _worker_encoder is not None
    return encode_documents(_worker_encoder, texts, eos_id)


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for text in documents:
        batch.append(text)
        size += len(text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encoded(info: TokenizerInfo, batches: Iterator[list[str]], workers: int) -> Iterator[Encoded]:
    if workers == 1:
        encoder = load(info)
        for batch in batches:
            yield encode_documents(encoder, batch, info.eos_id)
        return
    # spawn rather than fork: a forked child would inherit the parent's threads' locks (tqdm's, tokenizers').
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (info,)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch, info.eos_id)))
            # Bounded read-ahead (Pool.imap would read the whole input into memory ahead of the workers).
            if len(pending) > 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _check_flags(name: str, seq_len: int, workers: int, shard_samples: int) -> None:
    if not _NAME.fullmatch(name):
        raise DataError(f"--name={name!r}: use letters, digits, '.', '_' and '-' (not starting with '.' or '-')")
    for flag, value in (("--seq-len", seq_len), ("--workers", workers), ("--shard-samples", shard_samples)):
        if value <= 0:
            raise DataError(f"{flag}={value} must be positive")


def tokenize(
    inputs: list[str],
    tokenizer: str,
    output: Path,
    name: str,
    seq_len: int,
    workers: int = 1,
    shard_samples: int = DEFAULT_SHARD_SAMPLES,
    text_field: str = "text",
    eos_token: str | None = None,
    whole_documents: bool = False,
) -> dict[str, object]:
    """Tokenizes `inputs` into `output/name/` and returns the manifest it wrote there. With `whole_documents`, no
    document that fits in one sample is split across two (the rest of a sample is padded, see packing.Packer)."""
    _check_flags(name, seq_len, workers, shard_samples)
    files = resolve_inputs(inputs)
    info = describe(tokenizer, eos_token)
    dtype = np.dtype(np.uint16 if info.vocab_size <= 1 << 16 else np.uint32)
    documents = chain.from_iterable(iter_documents(path, text_field) for path in files)
    with staged_directory(Path(output) / name) as staging:
        packer = Packer(seq_len + 1, info.eos_id if whole_documents else None)
        writer = ShardWriter(staging, name, shard_samples, seq_len + 1, dtype)
        document_count = 0
        with tqdm(desc=f"tokenize {name}", unit="B", unit_scale=True, disable=None) as progress:
            for tokens, lengths, text_bytes in _encoded(info, _batches(documents), workers):
                for chunk, starts in packer.add(tokens, lengths):
                    writer.add(chunk, starts)
                document_count += len(lengths)
                progress.update(text_bytes)
        shards = writer.close()
        total_samples = sum(int(shard["samples"]) for shard in shards)
        if total_samples == 0:
            raise DataError(
                f"--name={name}: {packer.remainder} tokens from {document_count} documents do not fill one sample "
                f"of --seq-len + 1 = {seq_len + 1} tokens"
            )
        manifest = {
            "format": FORMAT,
            "source": name,
            "seq_len": seq_len,
            "dtype": dtype.name,
            # The path relative to this manifest's folder, so that the manifest finds it from any working directory.
            "tokenizer": {
                **info.to_json(),
                "path": os.path.relpath(os.path.abspath(info.path), Path(output, name).absolute()),
            },
            "shards": shards,
            "total_samples": total_samples,
            "total_tokens": total_samples * (seq_len + 1),
            "documents": document_count,
            "dropped_tokens": packer.remainder,
            # Padded instead of split (whole_documents): padding one-token EOS documents, documents longer than a
            # sample (split all the same).
            "whole_documents": whole_documents,
            "padding_tokens": packer.padding_tokens,
            "split_documents": packer.split_documents,
            "inputs": files,
        }
        # Last: a folder with a manifest is complete.
        write_bytes(staging / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return manifest
