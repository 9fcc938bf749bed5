"""ShardMixtureStream on real tar shards (written with the data pipeline's ShardWriter) and real DataLoader workers."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from nopetrain.config import ConfigError, DataConfig, ModelConfig, SourceConfig, TrainConfig
from nopetrain.data.streaming import ShardMixtureStream
from nopetrain.data_pipelines.errors import DataError
from nopetrain.data_pipelines.shards import ShardWriter

SEQ_LEN = 16
VOCAB = 512
MICRO = 4


def write_source(
    root: Path, name: str, shards: int = 8, samples: int = 8, manifest: bool = True, vocab_size: int = VOCAB
) -> dict[str, np.ndarray]:
    """Writes root/name/ with `shards` shards of `samples` samples; returns the starts written per "name/KEY"."""
    directory = root / name
    directory.mkdir(parents=True)
    rng = np.random.default_rng(len(name) * 1000 + shards)
    writer = ShardWriter(directory, name, samples, SEQ_LEN + 1, np.dtype(np.uint16))
    starts_by_key = {}
    for index in range(shards * samples):
        tokens = rng.integers(0, VOCAB, SEQ_LEN + 1)
        starts = np.sort(rng.choice(np.arange(1, SEQ_LEN + 1), size=3, replace=False)).astype(np.int32)
        if index % 2:  # every other sample starts with a new document
            starts = np.concatenate([[0], starts]).astype(np.int32)
        writer.add(tokens, starts)
        starts_by_key[f"{name}/{index // samples:06d}-{index % samples:07d}"] = starts
    records = writer.close()
    if manifest:
        (directory / "manifest.json").write_text(
            json.dumps(
                {
                    "format": "nopetrain-tokens-v1",
                    "source": name,
                    "seq_len": SEQ_LEN,
                    "dtype": "uint16",
                    "tokenizer": {"kind": "test", "vocab_size": vocab_size, "eos_id": 0},
                    "shards": records,
                }
            )
        )
    return starts_by_key


def rewrite_member(shard: Path, key: str, extension: str, array: np.ndarray | None) -> None:
    """Replaces (or, with None, removes) one member of a shard, keeping the rest as they are."""
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if info.name == f"{key}.{extension}":
                if array is None:
                    continue
                buffer = io.BytesIO()
                np.save(buffer, array)
                data = buffer.getvalue()
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def config(sources: dict[str, str | tuple[str, float]], workers: int = 2, on_error: str = "raise") -> TrainConfig:
    entries = {
        name: SourceConfig(path=spec, weight=1.0)
        if isinstance(spec, str)
        else SourceConfig(path=spec[0], weight=spec[1])
        for name, spec in sources.items()
    }
    data = DataConfig(name="test", kind="shards", sources=entries, num_workers=workers, on_error=on_error)
    return TrainConfig(model=ModelConfig(vocab_size=VOCAB), data=data, seq_len=SEQ_LEN, micro_batch_size=MICRO, seed=7)


@pytest.fixture
def open_stream() -> Iterator:
    """Builds streams and closes them (stopping their worker processes) when the test ends."""
    streams = []

    def build(cfg: TrainConfig, rank: int = 0, world_size: int = 1) -> ShardMixtureStream:
        streams.append(ShardMixtureStream(cfg, rank, world_size))
        return streams[-1]

    yield build
    for stream in streams:
        stream.close()


@pytest.fixture
def logged() -> Iterator[list[logging.LogRecord]]:
    """What the "nopetrain" logger logs at INFO and above (attached directly: the trainer turns propagation off)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("nopetrain")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def draw(stream: ShardMixtureStream, batches: int) -> list[str]:
    return [key for _ in range(batches) for key in stream.next_batch().keys]


def test_exact_resume_two_ranks_two_workers(tmp_path: Path, open_stream) -> None:
    write_source(tmp_path, "a")
    write_source(tmp_path, "b")
    cfg = config({"a": (str(tmp_path / "a"), 2.0), "b": (str(tmp_path / "b"), 1.0)})
    total, first = 7, 3
    straight = [draw(open_stream(cfg, rank, 2), total) for rank in range(2)]
    resumed = []
    for rank in range(2):
        stream = open_stream(cfg, rank, 2)
        before = draw(stream, first)
        torch.save(stream.state_dict(), tmp_path / f"rank{rank}.pt")
        stream.close()
        fresh = open_stream(cfg, rank, 2)
        fresh.load_state_dict(torch.load(tmp_path / f"rank{rank}.pt", weights_only=False))
        resumed.append(before + draw(fresh, total - first))
    assert resumed == straight
    assert {key.split("/")[0] for key in straight[0]} == {"a", "b"}


def test_two_ranks_two_workers_read_an_epoch_exactly_once(tmp_path: Path, open_stream) -> None:
    keys = write_source(tmp_path, "a")  # 8 shards x 8 samples: 2 shards per slot
    cfg = config({"a": str(tmp_path / "a")})
    drawn = [key for rank in range(2) for key in draw(open_stream(cfg, rank, 2), len(keys) // 2 // MICRO)]
    assert sorted(drawn) == sorted(keys)


@pytest.mark.parametrize("world_size,workers", [(1, 0), (1, 2)])
def test_resume_on_another_layout_neither_repeats_nor_loses(
    tmp_path: Path, open_stream, world_size: int, workers: int, logged
) -> None:
    keys = write_source(tmp_path, "a")
    cfg = config({"a": str(tmp_path / "a")})
    streams = [open_stream(cfg, rank, 2) for rank in range(2)]
    before = [key for stream in streams for key in draw(stream, 3)]  # 6 samples taken from every slot
    states = [stream.state_dict() for stream in streams]
    for stream in streams:
        stream.close()

    new_cfg = config({"a": str(tmp_path / "a")}, workers=workers)
    stream = open_stream(new_cfg, 0, world_size)
    with pytest.raises(ConfigError, match="merge_states"):
        stream.load_state_dict(states[0])
    stream.load_state_dict(ShardMixtureStream.merge_states(states))
    assert [record.getMessage() for record in logged if "merged over 2 rank(s) x 2 worker(s)" in record.getMessage()]
    after = draw(stream, (len(keys) - len(before)) // MICRO)
    assert sorted(before + after) == sorted(keys)
    assert stream.stats()["epoch/a"] == 1.0


def test_mixture_weights_switch_and_proportions(tmp_path: Path, open_stream) -> None:
    write_source(tmp_path, "a")
    write_source(tmp_path, "b")
    stream = open_stream(config({"a": (str(tmp_path / "a"), 1.0), "b": (str(tmp_path / "b"), 0.0)}, workers=1))
    assert {key.split("/")[0] for key in draw(stream, 3)} == {"a"}
    stream.set_weights({"a": 0.0, "b": 1.0})
    assert {key.split("/")[0] for key in draw(stream, 3)} == {"b"}
    stream.set_weights({"a": 3.0, "b": 1.0})
    counts = Counter(key.split("/")[0] for key in draw(stream, 100))
    assert 260 <= counts["a"] <= 340 and counts["a"] + counts["b"] == 400
    stats = stream.stats()
    assert (stats["samples/a"], stats["samples/b"]) == (counts["a"] + 12, counts["b"] + 12)
    with pytest.raises(ConfigError, match=r"data\.sources\.c"):
        stream.set_weights({"c": 1.0})


@pytest.mark.parametrize("shards,samples", [(1, 16), (16, 1)])  # the order within shards, then that of shards
def test_small_source_wraps_into_a_reshuffled_epoch(tmp_path: Path, open_stream, shards: int, samples: int) -> None:
    keys = write_source(tmp_path, "a", shards=shards, samples=samples)
    stream = open_stream(config({"a": str(tmp_path / "a")}, workers=0))
    first = draw(stream, len(keys) // MICRO)
    assert stream.stats()["epoch/a"] == 1.0
    second = draw(stream, len(keys) // MICRO)
    assert stream.stats()["epoch/a"] == 2.0
    assert sorted(first) == sorted(second) == sorted(keys)
    assert first != second


def test_document_masking_restarts_positions_at_written_starts(tmp_path: Path, open_stream) -> None:
    starts_by_key = write_source(tmp_path, "a", shards=2)
    stream = open_stream(config({"a": str(tmp_path / "a")}, workers=1))
    for _ in range(4):
        batch = stream.next_batch()
        for row, key in enumerate(batch.keys):
            begins = [0, *(int(start) for start in starts_by_key[key] if start < SEQ_LEN)]
            expected = [index - max(begin for begin in begins if begin <= index) for index in range(SEQ_LEN)]
            assert batch.position_ids[row].tolist() == expected
            ends = [int(start) - 1 for start in starts_by_key[key] if start > 0]
            assert all(batch.labels[row, end] == -100 for end in ends)


def test_manifestless_patterns(tmp_path: Path, open_stream) -> None:
    keys = write_source(tmp_path, "a", shards=4, manifest=False)
    pattern = f"{tmp_path}/a/a-{{000000..000003}}.tar"
    for path in (pattern, f"pipe:cat {pattern}"):
        stream = open_stream(config({"a": path}, workers=0))
        assert sorted(draw(stream, len(keys) // MICRO)) == sorted(keys)


def test_close_stops_the_workers(tmp_path: Path, open_stream) -> None:
    write_source(tmp_path, "a")
    stream = open_stream(config({"a": str(tmp_path / "a")}, workers=2))
    running = set(multiprocessing.active_children())
    draw(stream, 1)
    assert len(set(multiprocessing.active_children()) - running) == 2
    stream.close()
    assert set(multiprocessing.active_children()) <= running


def _bad_setup(root: Path, problem: str) -> str:
    """Breaks shard 1 of a two-shard source; returns the key of the bad sample ("" where there is none)."""
    shard = root / "a" / "a-000001.tar"
    key = "000001-0000003"
    if problem == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        return "after sample 000001-"
    if problem == "garbage":
        shard.write_bytes(np.random.default_rng(0).bytes(shard.stat().st_size))
        return ""
    if problem == "bitrot":  # data bytes change, the tar stays well-formed: only the manifest's sha256 can tell
        data = bytearray(shard.read_bytes())
        data[1536 + 128] ^= 1  # low bit of the first token of the first sample: still in the vocabulary
        shard.write_bytes(bytes(data))
        return ""
    if problem == "missing":
        shard.unlink()
        return ""
    tokens = np.arange(SEQ_LEN + 1, dtype=np.uint16)
    replacement = {
        "no starts": ("starts.npy", None),
        "short": ("tokens.npy", tokens[:-1]),
        "uint32": ("tokens.npy", tokens.astype(np.uint32)),
        "out of vocabulary": ("tokens.npy", np.full(SEQ_LEN + 1, VOCAB, dtype=np.uint16)),
    }[problem]
    rewrite_member(shard, key, *replacement)
    return key


PROBLEMS = ["truncated", "garbage", "bitrot", "missing", "no starts", "short", "uint32", "out of vocabulary"]


@pytest.mark.parametrize("problem", PROBLEMS)
def test_bad_shard_raises_one_line_naming_shard_and_sample(tmp_path: Path, open_stream, problem: str) -> None:
    write_source(tmp_path, "a", shards=2)
    key = _bad_setup(tmp_path, problem)
    stream = open_stream(config({"a": str(tmp_path / "a")}, workers=1))
    with pytest.raises(DataError) as raised:
        draw(stream, 8)  # two epochs: the bad shard comes up in each
    message = str(raised.value)
    assert "\n" not in message
    assert "data.sources.a" in message and "a-000001.tar" in message and key in message


@pytest.mark.parametrize("problem", PROBLEMS)
def test_bad_shard_is_skipped_counted_and_logged_once(tmp_path: Path, open_stream, problem: str, logged) -> None:
    write_source(tmp_path, "a", shards=2)
    _bad_setup(tmp_path, problem)
    stream = open_stream(config({"a": str(tmp_path / "a")}, workers=1, on_error="skip"))
    keys = draw(stream, 8)  # four epochs of the good shard
    assert all(key.startswith("a/000000-") for key in keys)
    assert stream.stats()["skipped_shards/a"] == 1.0
    assert stream.stats()["epoch/a"] >= 3.0
    warnings = [record.getMessage() for record in logged if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "a-000001.tar" in warnings[0] and "\n" not in warnings[0]


def test_manifest_that_miscounts_a_shards_tokens_is_refused(tmp_path: Path, open_stream) -> None:
    write_source(tmp_path, "a", shards=2)
    manifest_path = tmp_path / "a" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    held = manifest["shards"][1]["tokens"]
    manifest["shards"][1]["tokens"] = held + SEQ_LEN + 1  # one sample more than the shard holds
    manifest_path.write_text(json.dumps(manifest))
    stream = open_stream(config({"a": str(tmp_path / "a")}, workers=1))
    with pytest.raises(DataError) as raised:
        draw(stream, 8)
    message = str(raised.value)
    assert "data.sources.a" in message and "a-000001.tar" in message and "\n" not in message
    assert f"it holds {held} tokens, the manifest says {held + SEQ_LEN + 1}" in message


def test_manifestless_shard_cut_at_a_member_boundary(tmp_path: Path, open_stream) -> None:
    write_source(tmp_path, "a", shards=2, manifest=False)
    shard = tmp_path / "a" / "a-000001.tar"
    shard.write_bytes(shard.read_bytes()[: 3 * 2 * 1024])  # three whole samples, no end-of-archive blocks
    stream = open_stream(config({"a": f"{tmp_path}/a/a-{{000000..000001}}.tar"}, workers=1))
    with pytest.raises(DataError, match=r"a-000001\.tar: the tar is cut short .* after sample 000001-0000002"):
        draw(stream, 8)


def test_source_whose_shards_are_all_bad_stops(tmp_path: Path, open_stream) -> None:
    write_source(tmp_path, "a", shards=2)
    for shard in (tmp_path / "a").glob("*.tar"):
        shard.unlink()
    stream = open_stream(config({"a": str(tmp_path / "a")}, workers=1, on_error="skip"))
    with pytest.raises(DataError, match="all 2 shards are bad"):
        draw(stream, 1)


def test_skip_state_resumes_exactly(tmp_path: Path, open_stream) -> None:
    write_source(tmp_path, "a", shards=4)
    _bad_setup(tmp_path, "short")
    cfg = config({"a": str(tmp_path / "a")}, workers=2, on_error="skip")
    straight = draw(open_stream(cfg), 12)
    stream = open_stream(cfg)
    before = draw(stream, 5)
    fresh = open_stream(cfg)
    fresh.load_state_dict(stream.state_dict())
    assert before + draw(fresh, 7) == straight
    assert fresh.stats()["skipped_shards/a"] == 1.0


@pytest.mark.parametrize(
    "setup,overrides,expected",
    [
        ("no manifest", {}, r"data\.sources\.a\.path=.*no manifest\.json"),
        ("no match", {}, r"data\.sources\.a\.path=.*no shards matched"),
        ("empty", {}, r"data\.sources\.a\.path=.*empty"),
        ("ok", {"seq_len": 32}, r"seq_len=32 .*seq_len=16"),
        ("big vocabulary", {}, rf"model\.vocab_size={VOCAB} .*vocab_size=1000"),
        ("ok", {"world_size": 2}, r"data\.sources\.a\.path=.* 2 shard\(s\).*4 readers.*--shard-samples"),
    ],
)
def test_config_errors_at_construction(tmp_path: Path, setup: str, overrides: dict, expected: str) -> None:
    path = str(tmp_path / "a")
    if setup == "no manifest":
        (tmp_path / "a").mkdir()
    elif setup == "no match":
        path = f"{tmp_path}/a/a-{{000000..000003}}.tar"
    elif setup == "empty":
        write_source(tmp_path, "a", shards=0)
    else:
        write_source(tmp_path, "a", shards=2, vocab_size=1000 if setup == "big vocabulary" else VOCAB)
    cfg = config({"a": path}, workers=2)
    cfg.seq_len = overrides.get("seq_len", SEQ_LEN)
    with pytest.raises(ConfigError, match=expected) as raised:
        ShardMixtureStream(cfg, 0, overrides.get("world_size", 1))
    assert "\n" not in str(raised.value)
