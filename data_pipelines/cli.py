"""`nopetrain-data <command>` (or `python -m nopetrain.data_pipelines`): train-tokenizer, tokenize, build-default,
build-lookup.

A bad input or flag ends the command with one line, `nopetrain-data: error: ...`, and exit status 2, the way
argparse reports a bad command line.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .build_default import build_default
from .errors import DataError
from .tokenize_source import DEFAULT_SHARD_SAMPLES, tokenize
from .train_tokenizer import DEFAULT_THREADS, MODEL_TYPES, train_tokenizer

PROG = "nopetrain-data"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=" ".join(__doc__.split("\n\n")[0].split()))
    commands = parser.add_subparsers(dest="command", required=True)
    cores = os.cpu_count() or 1

    train = commands.add_parser("train-tokenizer", help="train a sentencepiece tokenizer with byte fallback")
    train.add_argument("--input", nargs="+", required=True, help="text, .jsonl(.gz/.zst) or .parquet paths or globs")
    train.add_argument("--output", type=Path, required=True, help="folder for tokenizer.model and tokenizer.vocab")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--model-type", choices=MODEL_TYPES, default="unigram")
    train.add_argument("--special-tokens", nargs="*", default=[], help="pieces kept whole, with ids from 4")
    train.add_argument("--max-mb", type=float, default=100.0, help="MB of documents to train on, shared by the files")
    train.add_argument("--text-field", default="text", help="JSONL field or Parquet column of the text")
    train.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="the model depends on it; keep it fixed")

    tok = commands.add_parser("tokenize", help="tokenize documents into webdataset shards of seq_len + 1 tokens")
    tok.add_argument("--input", nargs="+", required=True, help="paths, globs or fsspec URLs")
    tok.add_argument("--tokenizer", required=True, help="a sentencepiece .model or a Hugging Face tokenizer.json")
    tok.add_argument("--output", type=Path, required=True, help="writes OUTPUT/NAME/")
    tok.add_argument("--name", required=True, help="the source's name")
    tok.add_argument("--seq-len", type=int, required=True)
    tok.add_argument("--workers", type=int, default=cores, help="encoding processes (default: one per core)")
    tok.add_argument("--shard-samples", type=int, default=DEFAULT_SHARD_SAMPLES)
    tok.add_argument("--text-field", default="text", help="JSONL field or Parquet column of the text")
    tok.add_argument("--eos-token", help="the end-of-document token, if the tokenizer does not declare one")
    tok.add_argument(
        "--whole-documents",
        action="store_true",
        help="never split a document that fits in one sample: pad the rest of a sample instead (e.g. look-ups)",
    )

    default = commands.add_parser("build-default", help="build the embedded default corpus (web, code, math)")
    default.add_argument("--output", type=Path, required=True)
    default.add_argument("--seq-len", type=int, default=256)
    default.add_argument("--vocab-size", type=int, default=4096)
    default.add_argument("--seed", type=int, default=0)
    default.add_argument("--max-mb-per-source", type=float, default=4.0)
    default.add_argument("--workers", type=int, default=cores)

    lookup = commands.add_parser("build-lookup", help="add synthetic look-up documents (source lookup) to a corpus")
    lookup.add_argument("--corpus", type=Path, required=True, help="a folder written by build-default")
    lookup.add_argument("--documents", type=int, required=True)
    lookup.add_argument("--seed", type=int, default=0)
    lookup.add_argument("--value-digits", type=int, default=7, help="digits of each value (the paper's: 7)")
    lookup.add_argument("--seq-len", type=int, default=None, help="pack at this length (default: the corpus's)")
    lookup.add_argument("--name", default="lookup", help="the source's name (train/NAME)")
    lookup.add_argument(
        "--tasks", nargs="+", default=None, metavar="TASK", help="NIAH tasks to draw from (default: all four)"
    )
    return parser


def _run(args: argparse.Namespace) -> str:
    """Runs a command; returns the line that reports what it wrote."""
    if args.command == "train-tokenizer":
        model = train_tokenizer(
            args.input,
            args.output,
            args.vocab_size,
            args.model_type,
            tuple(args.special_tokens),
            args.max_mb,
            args.text_field,
            args.threads,
        )
        return f"wrote {model} ({args.vocab_size} pieces)"
    if args.command == "tokenize":
        manifest = tokenize(
            args.input,
            args.tokenizer,
            args.output,
            args.name,
            args.seq_len,
            args.workers,
            args.shard_samples,
            args.text_field,
            args.eos_token,
            args.whole_documents,
        )
        return (
            f"wrote {args.output / args.name}: {manifest['total_samples']} samples in {len(manifest['shards'])} "
            f"shards from {manifest['documents']} documents ({manifest['dropped_tokens']} tokens dropped)"
        )
    if args.command == "build-lookup":
        # Imported here: it needs the evaluation's NIAH layout (nopetrain.eval), which the other commands do not.
        from .corpus_lookup import build_lookup

        manifest = build_lookup(
            args.corpus, args.documents, args.seed, args.tasks, args.value_digits, args.seq_len, args.name
        )
        target = args.corpus / "train" / args.name
        return f"wrote {target}: {manifest['documents']} documents, {manifest['total_tokens']} tokens"
    corpus = build_default(args.output, args.seq_len, args.vocab_size, args.seed, args.max_mb_per_source, args.workers)
    tokens = sum(split["tokens"] for source in corpus["sources"].values() for split in source.values())
    return f"wrote {args.output}: {tokens} tokens in {len(corpus['sources'])} sources"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        print(_run(args))
    except DataError as exc:
        parser.exit(2, f"{PROG}: error: {exc}\n")
    return 0
