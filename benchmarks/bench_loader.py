"""Tokens per second through ShardMixtureStream.next_batch() in one process, for 0, 1 and 2 DataLoader workers.

    python benchmarks/bench_loader.py [--megabytes 64] [--seconds 5]

Writes two uint16 sources of seq_len-2048 shards (3:1 by size and weight) into a temporary directory, then draws
micro-batches with document masking on, as the trainer would. The first batch (worker start-up and first shard
reads) is timed apart from the steady rate.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from nopetrain.config import DataConfig, ModelConfig, SourceConfig, TrainConfig
from nopetrain.data.streaming import ShardMixtureStream
from nopetrain.data_pipelines.shards import ShardWriter

SEQ_LEN = 2048
VOCAB = 49152
SHARD_SAMPLES = 512


def write_source(root: Path, name: str, samples: int, seed: int) -> None:
    directory = root / name
    directory.mkdir()
    rng = np.random.default_rng(seed)
    writer = ShardWriter(directory, name, SHARD_SAMPLES, SEQ_LEN + 1, np.dtype(np.uint16))
    for _ in range(samples):
        starts = np.sort(rng.choice(SEQ_LEN + 1, size=4, replace=False)).astype(np.int32)
        writer.add(rng.integers(0, VOCAB, SEQ_LEN + 1, dtype=np.uint16), starts)
    manifest = {
        "format": "nopetrain-tokens-v1",
        "source": name,
        "seq_len": SEQ_LEN,
        "dtype": "uint16",
        "tokenizer": {"kind": "benchmark", "vocab_size": VOCAB, "eos_id": 0},
        "shards": writer.close(),
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))


def measure(root: Path, workers: int, micro_batch_size: int, seconds: float) -> tuple[float, float]:
    """(seconds to the first batch, tokens per second after it)."""
    sources = {"web": SourceConfig(str(root / "web"), 0.75), "code": SourceConfig(str(root / "code"), 0.25)}
    cfg = TrainConfig(
        model=ModelConfig(vocab_size=VOCAB),
        data=DataConfig(name="bench", kind="shards", sources=sources, num_workers=workers),
        seq_len=SEQ_LEN,
        micro_batch_size=micro_batch_size,
    )
    stream = ShardMixtureStream(cfg, rank=0, world_size=1)
    begin = time.perf_counter()
    stream.next_batch()
    started = time.perf_counter()
    batches = 0
    while time.perf_counter() - started < seconds:
        stream.next_batch()
        batches += 1
    elapsed = time.perf_counter() - started
    stream.close()
    return started - begin, batches * micro_batch_size * SEQ_LEN / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=64, help="token bytes to write, over both sources")
    parser.add_argument("--seconds", type=float, default=5, help="drawing time per setting")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    args = parser.parse_args()
    samples = int(args.megabytes * 2**20 / ((SEQ_LEN + 1) * 2))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        begin = time.perf_counter()
        write_source(root, "web", samples * 3 // 4, seed=0)
        write_source(root, "code", samples // 4, seed=1)
        print(f"wrote {samples} samples of {SEQ_LEN + 1} tokens in {time.perf_counter() - begin:.1f}s")
        print(f"{'workers':>7}  {'first batch':>11}  {'tokens/s':>12}")
        for workers in (0, 1, 2):
            first, rate = measure(root, workers, args.micro_batch_size, args.seconds)
            print(f"{workers:>7}  {first:>10.3f}s  {rate:>12,.0f}")


if __name__ == "__main__":
    main()
