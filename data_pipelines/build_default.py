"""`build-default`: the embedded default corpus for `make train`, made from what any machine with Python has.

Three sources: web (English prose shipped with Python and the installed packages), code (the standard library's
source) and math (seeded problems); see the corpus_* modules. The standard library's files
are split by a seeded hash: most feed code, the rest feed web's docstrings, so that no file is in both. Each source
is capped at `max_mb_per_source` and its documents are shuffled; about HELDOUT_FRACTION of them (chosen by a
seeded hash of their text) go to the held-out split. Shards are small (see MIN_SHARDS) so that many readers can
share even a small source. Output:

    DIR/tokenizer.model, DIR/tokenizer.vocab   trained on a sample of the three train splits and of look-up text
                                               (DIR/raw/tokenizer/lookup.jsonl: needles and questions alone)
    DIR/raw/{train,heldout}/SOURCE.jsonl       the documents, {"text": ...} per line
    DIR/{train,heldout}/SOURCE/                tokenized shards and manifest.json (see tokenize_source)
    DIR/corpus.json                            a summary, written last

The same seed on the same machine (same Python and packages) gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from nopetrain.atomic import write_bytes

from .corpus_code import code_documents, python_files
from .corpus_lookup import tokenizer_lookup_text
from .corpus_math import math_documents
from .corpus_web import web_documents
from .encoders import describe, load
from .errors import DataError
from .tokenize_source import tokenize
from .train_tokenizer import train_tokenizer

SOURCES = ("web", "code", "math")
HELDOUT_FRACTION = 0.03
# Standard-library files whose docstrings go to web instead of their source to code.
PROSE_FILE_SHARE = 0.25
# Text the tokenizer trains on, shared equally by the sources: more adds minutes, not quality, at this vocabulary.
TOKENIZER_SAMPLE_MB = 3.0
# The streaming loader gives every reader (rank x worker) its own shards, and shuffles within a shard: each split
# of each source gets at least this many shards (when it has that many samples), of at most MAX_SHARD_SAMPLES.
MIN_SHARDS = 32
MAX_SHARD_SAMPLES = 1024


def _digest(seed: int, text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest())


def take_bytes(documents: Iterable[str], max_bytes: float) -> list[str]:
    """The first documents, until they add up to max_bytes of UTF-8 (the last one may cross it)."""
    taken, size = [], 0
    for text in documents:
        if size >= max_bytes:
            break
        taken.append(text)
        size += len(text.encode("utf-8"))
    return taken


def split_heldout(documents: list[str], seed: int) -> tuple[list[str], list[str]]:
    """Holds out the documents with the lowest seeded hashes, until both HELDOUT_FRACTION of the documents and of
    the text (at least one document); both splits keep the documents' order."""
    by_hash = sorted(range(len(documents)), key=lambda i: _digest(seed, documents[i]))
    min_count = max(1, math.ceil(HELDOUT_FRACTION * len(documents)))
    min_chars = HELDOUT_FRACTION * sum(map(len, documents))
    held: set[int] = set()
    chars = 0
    for index in by_hash:
        if len(held) >= min_count and chars >= min_chars:
            break
        held.add(index)
        chars += len(documents[index])
    train = [text for i, text in enumerate(documents) if i not in held]
    return train, [documents[i] for i in sorted(held)]


def source_documents(seed: int, max_bytes: float) -> dict[str, list[str]]:
    """Each source's documents, capped and shuffled."""
    root = Path(sysconfig.get_paths()["stdlib"])
    stdlib = python_files(root)
    # Hashing the path within the standard library gives the same split wherever Python is installed.
    is_prose = [_digest(seed, path.relative_to(root).as_posix()) < PROSE_FILE_SHARE * 2**64 for path in stdlib]
    prose = [path for path, flag in zip(stdlib, is_prose, strict=True) if flag]
    code = [path for path, flag in zip(stdlib, is_prose, strict=True) if not flag]
    # Installed packages' docstrings too: the standard library alone has under a megabyte of them.
    prose += python_files(sysconfig.get_paths()["purelib"])
    for files in (prose, code):
        random.Random(seed).shuffle(files)
    streams: dict[str, Iterator[str]] = {
        "web": web_documents(prose),
        "code": code_documents(code),
        "math": math_documents(seed),
    }
    documents = {}
    for name, stream in streams.items():
        documents[name] = take_bytes(stream, max_bytes)
        random.Random(f"{seed}-{name}").shuffle(documents[name])
        if not documents[name]:
            raise DataError(f"build-default: source {name!r} found no documents on this machine (empty source)")
    return documents


def shard_samples(tokenizer: Path, documents: list[str], seq_len: int) -> int:
    """Samples per shard that cut these documents into MIN_SHARDS shards or more, from their exact token count."""
    info = describe(str(tokenizer))
    tokens = sum(len(ids) + 1 for ids in load(info).encode(documents))  # + 1: each document's EOS
    return max(1, min(MAX_SHARD_SAMPLES, tokens // (seq_len + 1) // MIN_SHARDS))


def _write_jsonl(path: Path, documents: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, "".join(json.dumps({"text": text}) + "\n" for text in documents).encode("utf-8"))


def build_default(
    output: Path,
    seq_len: int = 256,
    vocab_size: int = 4096,
    seed: int = 0,
    max_mb_per_source: float = 4.0,
    workers: int = 1,
) -> dict[str, object]:
    """Builds the default corpus into `output` and returns the summary it wrote to output/corpus.json."""
    if max_mb_per_source <= 0:
        raise DataError(f"--max-mb-per-source={max_mb_per_source} must be positive")
    output = Path(output)
    splits: dict[str, dict[str, list[str]]] = {"train": {}, "heldout": {}}
    for name, documents in source_documents(seed, max_mb_per_source * 1e6).items():
        splits["train"][name], splits["heldout"][name] = split_heldout(documents, seed)
    for split, sources in splits.items():
        for name, documents in sources.items():
            _write_jsonl(output / "raw" / split / f"{name}.jsonl", documents)
    # The look-up text too: the synthetic look-up source (corpus_lookup.py), added later with this tokenizer, and the
    # evaluation's needles are made of it.
    lookup_text = output / "raw" / "tokenizer" / "lookup.jsonl"
    _write_jsonl(lookup_text, tokenizer_lookup_text(seed))
    train_files = [str(output / "raw" / "train" / f"{name}.jsonl") for name in SOURCES] + [str(lookup_text)]
    tokenizer = train_tokenizer(train_files, output, vocab_size, max_mb=TOKENIZER_SAMPLE_MB)
    summary: dict[str, dict[str, object]] = {name: {} for name in SOURCES}
    for split, sources in splits.items():
        for name, documents in sources.items():
            manifest = tokenize(
                [str(output / "raw" / split / f"{name}.jsonl")],
                str(tokenizer),
                output / split,
                name,
                seq_len,
                workers=workers,
                shard_samples=shard_samples(tokenizer, documents, seq_len),
            )
            summary[name][split] = {
                "path": f"{split}/{name}",
                "documents": manifest["documents"],
                "text_bytes": sum(len(text.encode("utf-8")) for text in documents),
                "samples": manifest["total_samples"],
                "tokens": manifest["total_tokens"],
                "dropped_tokens": manifest["dropped_tokens"],
                "shards": len(manifest["shards"]),
            }
    corpus = {
        "format": "nopetrain-corpus-v1",
        "seed": seed,
        "seq_len": seq_len,
        "max_mb_per_source": max_mb_per_source,
        "heldout_fraction": HELDOUT_FRACTION,
        "tokenizer": {**describe(str(tokenizer)).to_json(), "path": tokenizer.name},  # relative to DIR
        "sources": summary,
    }
    write_bytes(output / "corpus.json", (json.dumps(corpus, indent=2) + "\n").encode("utf-8"))
    return corpus
