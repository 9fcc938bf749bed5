"""The data tools end to end on small real inputs: a trained sentencepiece model, real tars read by webdataset."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import webdataset as wds
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nopetrain.data.shards import read_documents
from nopetrain.data_pipelines import tokenize_source
from nopetrain.data_pipelines.cli import main
from nopetrain.data_pipelines.corpus_lookup import tokenizer_lookup_text
from nopetrain.data_pipelines.corpus_math import math_documents
from nopetrain.data_pipelines.errors import DataError
from nopetrain.data_pipelines.lookup_text import LOOKUP_LIKE
from nopetrain.data_pipelines.packing import Packer
from nopetrain.data_pipelines.shards import ShardWriter
from nopetrain.data_pipelines.tokenize_source import tokenize
from nopetrain.data_pipelines.train_tokenizer import train_tokenizer

from .helpers import REPO, subprocess_env

WORDS = ("the", "a", "of", "and", "to", "in", "is", "was", "river", "stone", "light", "quiet", "green", "falcon")
SHORT_DOC = "Café au lait: naïve 日本語 costs €3.\n    indented line\tand a tab."
SEQ_LEN = 31


def make_documents(count: int, seed: int = 0) -> list[str]:
    """Prose, code, math and look-up text, plus one short document with non-ASCII text that byte fallback must
    carry."""
    rng = random.Random(seed)
    problems = math_documents(seed)
    lookups = iter(tokenizer_lookup_text(seed))
    documents = [SHORT_DOC]
    for i in range(count - 1):
        if i % 3 == 0:
            sentences = [" ".join(rng.choices(WORDS, k=rng.randint(4, 14))).capitalize() + "." for _ in range(8)]
            documents.append(" ".join(sentences[:4]) + "\n\n" + " ".join(sentences[4:]))
        elif i % 3 == 1:
            documents.append(f"def f{i}(x):\n    # scale by {i}\n    return x * {i} + {rng.randint(0, 99)}\n")
        else:
            documents.append(next(problems) if i % 6 == 2 else next(lookups))
    return documents


def write_jsonl(path: Path, documents: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: text, "id": i}) + "\n" for i, text in enumerate(documents)))
    return path


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return make_documents(400)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, documents: list[str]) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", documents)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    return train_tokenizer([str(corpus)], tmp_path_factory.mktemp("tok"), 512, special_tokens=("<|sep|>",))


def read_samples(directory: Path) -> list[dict]:
    manifest = json.loads((directory / "manifest.json").read_text())
    urls = [str(directory / shard["path"]) for shard in manifest["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False).decode())


def expected_stream(processor: spm.SentencePieceProcessor, documents: list[str]) -> list[int]:
    return [token for text in documents for token in [*processor.encode(text), processor.eos_id()]]


def folder_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_tokenizer_has_fixed_ids_round_trips_text_and_is_deterministic(
    tmp_path: Path, corpus: Path, sp_model: Path
) -> None:
    processor = spm.SentencePieceProcessor(model_file=str(sp_model))
    pieces = [processor.id_to_piece(i) for i in range(5)]
    assert pieces == ["<unk>", "<s>", "</s>", "<pad>", "<|sep|>"]
    assert (processor.unk_id(), processor.bos_id(), processor.eos_id(), processor.pad_id()) == (0, 1, 2, 3)
    assert processor.get_piece_size() == 512
    assert sp_model.with_suffix(".vocab").read_text().splitlines()[2] == "</s>\t0"
    unseen = "Ωμέγα ∑ 🙂 and\n  exact   spacing"  # characters the corpus lacks go through bytes
    assert processor.decode(processor.encode(unseen)) == unseen
    assert processor.encode("a<|sep|>b").count(4) == 1
    again = train_tokenizer([str(corpus)], tmp_path, 512, special_tokens=("<|sep|>",))
    assert again.read_bytes() == sp_model.read_bytes()


def test_tokenize_writes_the_contract_layout(tmp_path: Path, documents: list[str], corpus: Path, sp_model: Path):
    manifest = tokenize([str(corpus)], str(sp_model), tmp_path, "prose", SEQ_LEN, workers=1, shard_samples=50)
    out = tmp_path / "prose"
    processor = spm.SentencePieceProcessor(model_file=str(sp_model))
    stream = expected_stream(processor, documents)
    total = len(stream) // (SEQ_LEN + 1)

    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "nopetrain-tokens-v1"
    assert (manifest["source"], manifest["seq_len"], manifest["dtype"]) == ("prose", SEQ_LEN, "uint16")
    assert manifest["tokenizer"] == {
        "kind": "sentencepiece",
        "path": os.path.relpath(sp_model, out),
        "sha256": hashlib.sha256(sp_model.read_bytes()).hexdigest(),
        "vocab_size": 512,
        "eos_id": 2,
    }
    assert manifest["total_samples"] == total and manifest["total_tokens"] == total * (SEQ_LEN + 1)
    assert manifest["documents"] == len(documents)
    assert manifest["dropped_tokens"] == len(stream) - total * (SEQ_LEN + 1) > 0
    assert manifest["inputs"] == [str(corpus)]
    shards = manifest["shards"]
    assert [shard["path"] for shard in shards] == [f"prose-{i:06d}.tar" for i in range(len(shards))]
    assert [shard["samples"] for shard in shards] == [50] * (len(shards) - 1) + [total - 50 * (len(shards) - 1)]
    for shard in shards:
        assert shard["tokens"] == shard["samples"] * (SEQ_LEN + 1)
        assert shard["sha256"] == hashlib.sha256((out / shard["path"]).read_bytes()).hexdigest()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["prose"]  # no staging folder left
    assert sorted(path.name for path in out.iterdir()) == sorted(["manifest.json", *(s["path"] for s in shards)])

    samples = read_samples(out)
    assert [s["__key__"] for s in samples[:2]] == ["000000-0000000", "000000-0000001"]
    assert samples[50]["__key__"] == "000001-0000000"
    chunks = [s["tokens.npy"] for s in samples]
    assert all(c.dtype == np.uint16 and c.shape == (SEQ_LEN + 1,) for c in chunks)
    tokens = np.concatenate(chunks).tolist()
    assert tokens == stream[: total * (SEQ_LEN + 1)]
    for i, (chunk, sample) in enumerate(zip(chunks, samples, strict=True)):
        # The definition: after each EOS inside the chunk, and 0 when the previous chunk ended with EOS.
        after_eos = [j + 1 for j in np.flatnonzero(chunk == 2) if j + 1 < len(chunk)]
        begins_at_zero = i == 0 or bool(chunks[i - 1][-1] == 2)
        assert sample["starts.npy"].dtype == np.int32
        assert sample["starts.npy"].tolist() == [0] * begins_at_zero + after_eos
    assert processor.decode(tokens[: tokens.index(2)]) == SHORT_DOC
    assert any(len(s["starts.npy"]) == 0 for s in samples)  # a chunk inside one long document


def test_a_manifest_finds_its_tokenizer_from_any_working_directory(
    tmp_path: Path, corpus: Path, sp_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(sp_model.parent)
    tokenize([str(corpus)], sp_model.name, tmp_path / "data", "prose", SEQ_LEN)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _, record = read_documents(str(tmp_path / "data" / "prose"), 512)
    assert Path(record["path"]).resolve() == sp_model.resolve()
    # A manifest written before 2026-12-02 holds the path relative to where tokenize ran.
    manifest_path = tmp_path / "data" / "prose" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["tokenizer"]["path"] = os.path.relpath(sp_model, elsewhere)
    manifest_path.write_text(json.dumps(manifest))
    _, record = read_documents(str(tmp_path / "data" / "prose"), 512)
    assert Path(record["path"]).resolve() == sp_model.resolve()


def test_the_data_command_never_imports_torch() -> None:
    """nopetrain-data runs on machines that only prepare data, and starts in a fraction of torch's import time; the
    import contracts of `make lint` say the same of every module of the package."""
    code = "import nopetrain.data_pipelines.cli, sys; print([m for m in ('torch', 'deepspeed') if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def zstd_compress(data: bytes) -> bytes:
    """Imported where used, as the pipeline imports it: a module-level import made the whole file, and with it the
    suite's collection, fail on an interpreter without zstandard (the GPU image has none)."""
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


@pytest.mark.parametrize("fmt", ["jsonl.gz", "jsonl.zst", "parquet", "txt"])
def test_input_formats_give_the_same_shards(
    tmp_path: Path, documents: list[str], corpus: Path, sp_model: Path, fmt: str
) -> None:
    reference = tokenize([str(corpus)], str(sp_model), tmp_path / "ref", "s", SEQ_LEN, shard_samples=100)
    raw = corpus.read_bytes()
    field = "text"
    if fmt == "jsonl.gz":
        (tmp_path / "docs.jsonl.gz").write_bytes(gzip.compress(raw))
        inputs = [str(tmp_path / "docs.jsonl.gz")]
    elif fmt == "jsonl.zst":
        (tmp_path / "docs.jsonl.zst").write_bytes(zstd_compress(raw))
        inputs = [str(tmp_path / "docs.jsonl.zst")]
    elif fmt == "parquet":
        field = "content"
        half = len(documents) // 2  # two files, so that a glob's sorted order matters
        pq.write_table(pa.table({field: documents[:half]}), tmp_path / "part-0.parquet", row_group_size=64)
        pq.write_table(pa.table({field: documents[half:]}), tmp_path / "part-1.parquet", row_group_size=64)
        inputs = [str(tmp_path / "part-*.parquet")]
    else:
        (tmp_path / "docs").mkdir()
        for i, text in enumerate(documents):
            (tmp_path / "docs" / f"{i:04d}.txt").write_text(text, encoding="utf-8")
        inputs = [str(tmp_path / "docs" / "*.txt")]
    manifest = tokenize(inputs, str(sp_model), tmp_path / "out", "s", SEQ_LEN, shard_samples=100, text_field=field)
    assert manifest["shards"] == reference["shards"]
    assert manifest["documents"] == len(documents)


def test_reruns_and_worker_counts_give_identical_bytes(
    tmp_path: Path, corpus: Path, sp_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokenize_source, "BATCH_CHARS", 4000)  # many batches in flight between the workers
    tokenize([str(corpus)], str(sp_model), tmp_path / "one", "s", SEQ_LEN, workers=1, shard_samples=64)
    first = folder_bytes(tmp_path / "one" / "s")
    tokenize([str(corpus)], str(sp_model), tmp_path / "one", "s", SEQ_LEN, workers=1, shard_samples=64)
    assert folder_bytes(tmp_path / "one" / "s") == first
    tokenize([str(corpus)], str(sp_model), tmp_path / "two", "s", SEQ_LEN, workers=2, shard_samples=64)
    assert folder_bytes(tmp_path / "two" / "s") == first

    with tarfile.open(tmp_path / "one" / "s" / "s-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert {(m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0o444, 0, 0, "", "")}


def test_shards_are_the_bytes_tarfile_writes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    samples = [(rng.integers(0, 500, 33), np.sort(rng.choice(33, size=n, replace=False))) for n in (0, 1, 4, 2, 0)]
    writer = ShardWriter(tmp_path, "x", 3, 33, np.dtype(np.uint16))
    for tokens, starts in samples:
        writer.add(tokens, starts)
    records = writer.close()
    for index, record in enumerate(records):
        expected = io.BytesIO()
        with tarfile.open(fileobj=expected, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i, (tokens, starts) in enumerate(samples[3 * index : 3 * index + 3]):
                for member, array in (("starts", starts.astype(np.int32)), ("tokens", tokens.astype(np.uint16))):
                    data = io.BytesIO()
                    np.save(data, array)
                    info = tarfile.TarInfo(f"{index:06d}-{i:07d}.{member}.npy")
                    info.size, info.mtime, info.mode, info.uname, info.gname = len(data.getvalue()), 0, 0o444, "", ""
                    tar.addfile(info, io.BytesIO(data.getvalue()))
        assert (tmp_path / record["path"]).read_bytes() == expected.getvalue()
    assert [record["samples"] for record in records] == [3, 2]


def hf_bpe(directory: Path, documents: list[str]) -> Path:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(documents, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


def test_hugging_face_tokenizer_json(tmp_path: Path, documents: list[str], corpus: Path) -> None:
    path = hf_bpe(tmp_path, documents)
    tokenizer = Tokenizer.from_file(str(path))
    eos = tokenizer.token_to_id("<|endoftext|>")
    manifest = tokenize([str(corpus)], str(path), tmp_path, "hf", SEQ_LEN, workers=2, shard_samples=100)
    assert manifest["tokenizer"]["kind"] == "hf"
    assert manifest["tokenizer"]["eos_id"] == eos
    assert manifest["tokenizer"]["vocab_size"] == tokenizer.get_vocab_size() <= 400
    stream = [t for text in documents for t in [*tokenizer.encode(text, add_special_tokens=False).ids, eos]]
    tokens = np.concatenate([s["tokens.npy"] for s in read_samples(tmp_path / "hf")]).tolist()
    assert tokens == stream[: len(tokens)]
    assert tokenizer.decode(tokens[: tokens.index(eos)]) == SHORT_DOC


def test_vocabulary_over_65536_uses_uint32(tmp_path: Path) -> None:
    vocab = {"[UNK]": 0, "<|endoftext|>": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    corpus = write_jsonl(tmp_path / "docs.jsonl", [f"w69990 w{i} w5" for i in range(10)])
    manifest = tokenize([str(corpus)], str(tmp_path / "tokenizer.json"), tmp_path, "big", 7, workers=1)
    assert manifest["dtype"] == "uint32"
    tokens = np.concatenate([s["tokens.npy"] for s in read_samples(tmp_path / "big")])
    assert tokens.dtype == np.uint32
    assert tokens[:8].tolist() == [69992, 2, 7, 1, 69992, 3, 7, 1]


def test_fsspec_urls_are_inputs(tmp_path: Path, documents: list[str], corpus: Path, sp_model: Path) -> None:
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    memory.pipe("/nopetrain-test/a.jsonl.gz", gzip.compress(corpus.read_bytes()))
    try:
        manifest = tokenize(["memory://nopetrain-test/*.jsonl.gz"], str(sp_model), tmp_path, "url", SEQ_LEN)
    finally:
        memory.rm("/nopetrain-test", recursive=True)
    assert manifest["inputs"] == ["memory:///nopetrain-test/a.jsonl.gz"]
    assert manifest["documents"] == len(documents)


def test_packer_edges() -> None:
    packer = Packer(4)
    # Documents of 4 (ends exactly at the chunk's end), 6 (longer than a chunk) and 3 tokens.
    chunks = packer.add(np.arange(13, dtype=np.uint32), np.array([4, 6, 3]))
    assert [c.tolist() for c, _ in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert [s.tolist() for _, s in chunks] == [[0], [0], [2]]
    assert packer.remainder == 1
    chunks = packer.add(np.arange(13, 16, dtype=np.uint32), np.array([3]))
    assert [(c.tolist(), s.tolist()) for c, s in chunks] == [([12, 13, 14, 15], [1])]
    assert packer.remainder == 0


def test_packer_whole_documents_pad_instead_of_splitting() -> None:
    packer = Packer(4, pad_id=9)
    # Documents of 3, 2 (does not fit the 1 token left: padded), 6 (longer than a chunk: split) and 2 tokens.
    chunks = packer.add(np.arange(13, dtype=np.uint32), np.array([3, 2, 6, 2]))
    assert [c.tolist() for c, _ in chunks] == [[0, 1, 2, 9], [3, 4, 5, 6], [7, 8, 9, 10]]
    assert [s.tolist() for _, s in chunks] == [[0, 3], [0, 2], []]
    assert (packer.padding_tokens, packer.split_documents, packer.remainder) == (1, 1, 2)


def test_whole_documents_sit_in_one_sample_and_padding_takes_no_loss(
    tmp_path: Path, documents: list[str], corpus: Path, sp_model: Path
) -> None:
    """Every document that fits in a sample lies inside one (found whole between its sample's starts), and the
    padding around it has no label."""
    from nopetrain.data import batch_from_chunks

    seq_len = 127  # most of these documents fit in a sample (SEQ_LEN holds none)
    manifest = tokenize([str(corpus)], str(sp_model), tmp_path, "whole", seq_len, whole_documents=True)
    processor = spm.SentencePieceProcessor(model_file=str(sp_model))
    encoded = [[*processor.encode(text), 2] for text in documents]
    fitting = [ids for ids in encoded if len(ids) <= seq_len + 1]
    assert (manifest["whole_documents"], manifest["split_documents"]) == (True, len(encoded) - len(fitting))
    assert manifest["padding_tokens"] > 0 and len(fitting) > 100
    samples = read_samples(tmp_path / "whole")
    found = []
    for sample in samples:
        tokens, starts = sample["tokens.npy"].tolist(), sample["starts.npy"].tolist()
        bounds = [*starts, len(tokens)] if starts[:1] == [0] else [0, *starts, len(tokens)]
        found += [tokens[a:b] for a, b in itertools.pairwise(bounds)]
    whole = {tuple(ids) for ids in found}
    # The last documents may sit in the dropped remainder.
    assert sum(tuple(ids) in whole for ids in fitting) >= len(fitting) - 2

    chunks = np.stack([sample["tokens.npy"] for sample in samples])
    batch = batch_from_chunks(chunks, [sample["starts.npy"] for sample in samples], document_masking=True)
    pad_inputs = 0
    for row, sample in enumerate(samples):
        starts = sample["starts.npy"].tolist()
        # A padding token is a one-token document: an EOS that starts right after another start or an EOS.
        for position in range(1, seq_len):
            if position in starts and position + 1 in starts:
                pad_inputs += 1
                assert batch.labels[row, position] == -100
    assert pad_inputs > 0


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "pattern", "message"),
    [
        (None, "missing.jsonl", "missing.jsonl: no such file"),
        (None, "*.jsonl", "*.jsonl: no files match"),
        ("", "empty.jsonl", "empty.jsonl: no documents (empty source)"),
        ('{"text": "fine"}\n{"text": broken\n', "bad.jsonl", "bad.jsonl:2: not a JSON line"),
        ('{"text": "fine"}\n\n{"body": "no text"}\n', "field.jsonl", "field.jsonl:3: no field 'text'"),
        ('{"text": 7}\n', "type.jsonl", "type.jsonl:1: field 'text' is int, not a string"),
    ],
)
def test_input_errors_are_one_line_naming_the_file(
    tmp_path: Path, sp_model: Path, capsys: pytest.CaptureFixture[str], content: str | None, pattern: str, message: str
) -> None:
    if content is not None:
        (tmp_path / pattern).write_text(content)
    args = ["--input", str(tmp_path / pattern), "--output", str(tmp_path / "out"), "--seq-len", "8"]
    code, err = run_cli(capsys, "tokenize", *args, "--tokenizer", str(sp_model), "--name", "x")
    assert code == 2
    assert err.startswith(f"nopetrain-data: error: {tmp_path / message}") and err.count("\n") == 1
    code, err = run_cli(capsys, "train-tokenizer", *args[:4], "--vocab-size", "300")
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "out" / "x").exists() and not (tmp_path / "out" / "tokenizer.model").exists()


@pytest.mark.parametrize("suffix", ["gz", "zst"])
def test_truncated_compressed_input_is_an_error(tmp_path: Path, corpus: Path, sp_model: Path, suffix: str) -> None:
    # A cut-off download must not pass for a shorter corpus.
    compress = gzip.compress if suffix == "gz" else zstd_compress
    data = compress(corpus.read_bytes())
    path = tmp_path / f"docs.jsonl.{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"^{path}: .*"):
        tokenize([str(path)], str(sp_model), tmp_path, "s", SEQ_LEN)
    path.write_bytes(b"not compressed at all" * 10)
    with pytest.raises(DataError, match=f"^{path}: "):
        tokenize([str(path)], str(sp_model), tmp_path, "s", SEQ_LEN)


def test_flag_errors(tmp_path: Path, corpus: Path, sp_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["tokenize", "--input", str(corpus), "--output", str(tmp_path), "--name", "x"]
    code, err = run_cli(capsys, *common, "--tokenizer", str(sp_model), "--seq-len", "100000")
    assert code == 2 and "do not fill one sample of --seq-len + 1 = 100001 tokens" in err
    code, err = run_cli(capsys, *common, "--tokenizer", str(tmp_path / "t.bin"), "--seq-len", "8")
    assert code == 2 and "--tokenizer=" in err and "expected a sentencepiece .model" in err
    code, err = run_cli(capsys, "train-tokenizer", "--input", str(corpus), "--output", str(tmp_path), "--vocab-size=9")
    assert code == 2 and err.startswith("nopetrain-data: error: sentencepiece training failed:")
    assert list(tmp_path.iterdir()) == []


def test_failed_run_keeps_the_previous_output(tmp_path: Path, corpus: Path, sp_model: Path) -> None:
    tokenize([str(corpus)], str(sp_model), tmp_path, "s", SEQ_LEN, shard_samples=40)
    before = folder_bytes(tmp_path / "s")
    bad = tmp_path / "zz-bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"zz-bad\.jsonl:2"):
        tokenize([str(corpus), str(bad)], str(sp_model), tmp_path, "s", SEQ_LEN, shard_samples=40)
    assert folder_bytes(tmp_path / "s") == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["s", "zz-bad.jsonl"]


def test_module_entry_point_reports_errors(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "nopetrain.data_pipelines", "tokenize", "--input", str(tmp_path / "none.jsonl")]
    cmd += ["--tokenizer", "t.model", "--output", str(tmp_path), "--name", "x", "--seq-len", "8"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == f"nopetrain-data: error: {tmp_path / 'none.jsonl'}: no such file\n"


def test_math_holds_no_lookup_and_leaves_the_answer_cue_to_lookups() -> None:
    """Look-ups packed into math samples lost their needles, and "Answer:" followed by a computed number competed
    with the evaluation's "Answer:", which a look-up answers from the context."""
    documents = list(itertools.islice(math_documents(0), 2000))
    assert not any(LOOKUP_LIKE.search(line) for document in documents for line in document.splitlines())
    assert all(document.splitlines()[-1].startswith("Result: ") for document in documents)


def test_build_default_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--max-mb-per-source", "0.08", "--vocab-size", "600", "--seq-len", "64", "--workers", "1"]
    assert main(["build-default", "--output", str(tmp_path / "a"), *args]) == 0
    assert "wrote" in capsys.readouterr().out
    corpus = json.loads((tmp_path / "a" / "corpus.json").read_text())
    tokenizer_bytes = (tmp_path / "a" / "tokenizer.model").read_bytes()
    assert corpus["tokenizer"]["sha256"] == hashlib.sha256(tokenizer_bytes).hexdigest()
    assert corpus["tokenizer"]["vocab_size"] == 600
    assert set(corpus["sources"]) == {"web", "code", "math"}
    for name, splits in corpus["sources"].items():
        train = {json.loads(line)["text"] for line in (tmp_path / "a" / "raw" / "train" / f"{name}.jsonl").open()}
        heldout = {json.loads(line)["text"] for line in (tmp_path / "a" / "raw" / "heldout" / f"{name}.jsonl").open()}
        assert heldout and not heldout & train
        for split in ("train", "heldout"):
            manifest = json.loads((tmp_path / "a" / split / name / "manifest.json").read_text())
            assert manifest["total_samples"] == splits[split]["samples"] > 0
            # Enough shards for 32 readers (ranks x workers), when there are that many samples.
            assert splits[split]["shards"] == len(manifest["shards"]) >= min(32, manifest["total_samples"])
            assert manifest["seq_len"] == 64 and manifest["tokenizer"]["sha256"] == corpus["tokenizer"]["sha256"]
        assert 0 < splits["heldout"]["text_bytes"] < 0.25 * splits["train"]["text_bytes"]
        assert splits["train"]["text_bytes"] + splits["heldout"]["text_bytes"] >= 80_000  # the cap
    # Same seed, same machine: the same bytes (manifests name their inputs, which live in the output folder).
    assert main(["build-default", "--output", str(tmp_path / "b"), *args]) == 0
    for path in sorted((tmp_path / "a").rglob("*")):
        if path.is_file():
            expected = path.read_bytes().replace(str(tmp_path / "a").encode(), str(tmp_path / "b").encode())
            assert (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes() == expected, path
