"""Tokenize throughput on this machine, in MB of UTF-8 text per second per core.

Uses the default corpus's own text (web, code and math in equal parts, made on the spot, no download) and a
tokenizer trained on it, then times the `tokenize` command end to end (read JSONL, encode, pack, write shards) with
one worker and with one per core, and the bare encode call for reference. Per core means per CPU-second used (this
process and its workers), which holds on a machine that other jobs share; the wall-clock rate is printed too.
Not part of the test suite:

    python benchmarks/bench_tokenize.py [--mb 12] [--model-type unigram|bpe] [--vocab-size 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from nopetrain.data_pipelines.build_default import source_documents
from nopetrain.data_pipelines.encoders import describe, load
from nopetrain.data_pipelines.tokenize_source import encode_documents, tokenize
from nopetrain.data_pipelines.train_tokenizer import train_tokenizer


def timed(run: Callable[[], object]) -> tuple[float, float]:
    """Wall-clock and CPU seconds of `run`, the CPU of worker processes included once they have exited."""

    def cpu() -> float:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + children.ru_utime + children.ru_stime

    wall, used = time.perf_counter(), cpu()
    run()
    return time.perf_counter() - wall, cpu() - used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=12.0, help="MB of text to tokenize")
    parser.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    documents = [text for docs in source_documents(0, args.mb * 1e6 / 3).values() for text in docs]
    megabytes = sum(len(text.encode("utf-8")) for text in documents) / 1e6
    with tempfile.TemporaryDirectory() as scratch:
        corpus = Path(scratch, "corpus.jsonl")
        corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents), encoding="utf-8")
        model = train_tokenizer([str(corpus)], Path(scratch), args.vocab_size, args.model_type, max_mb=3)
        info = describe(str(model))

        encoder = load(info)
        _, encode_cpu = timed(partial(encode_documents, encoder, documents, info.eos_id))
        results = {}
        for workers in sorted({1, args.workers}):
            output = Path(scratch, f"out{workers}")
            results[workers] = timed(partial(tokenize, [str(corpus)], str(model), output, "b", 256, workers=workers))

    print(f"text: {megabytes:.1f} MB, tokenizer: {args.model_type} {args.vocab_size}, cores: {os.cpu_count()}")
    print(f"encode call alone: {megabytes / encode_cpu:.1f} MB per CPU-second")
    for workers, (wall, used) in results.items():
        print(
            f"tokenize end to end, {workers} worker(s): {megabytes / wall:.1f} MB/s wall clock, "
            f"{megabytes / used:.1f} MB per CPU-second"
        )
    print(f"tokenize throughput: {megabytes / results[1][1]:.1f} MB/s/core")


if __name__ == "__main__":
    main()
