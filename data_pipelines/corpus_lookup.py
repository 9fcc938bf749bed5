"""Synthetic look-up training documents: the long-context evaluation's needle tasks at a length the model trains at.

A document is filler text (an excerpt of a training source's raw text) with the needle lines of one task inserted at
random places, then the question and its answer, e.g.

    ...filler...
    key: amber falcon, value: 4829301
    ...filler...
    Question: what is the value of the key "amber falcon"?
    Answer: 4829301

The needles, questions and answers come from `nopetrain.eval.niah.needle_task`, the same text the evaluation hides
in held-out text at 2-8x the training context. Training on them makes retrieval learnable within the context at tiny
scale, so the evaluation measures what happens beyond it. Each document fits one training sample with its EOS, so
packing never separates a question from its needles.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from nopetrain.eval.config import NIAH_TASKS
from nopetrain.eval.niah import needle_task

from .atomic import write_bytes
from .encoders import Encoder, describe, load
from .errors import DataError
from .tokenize_source import tokenize

# Filler comes from these sources of the default corpus (prose and code; math already holds short look-ups).
FILLER_SOURCES = ("web", "code")
# Characters per token to start from when sizing the filler; a document that encodes too long is cut down.
CHARS_PER_TOKEN = 4.0
SHRINK = 0.85


def _snap(text: str, offset: int) -> int:
    """The offset of the next line or word start at or after `offset`, so needles sit between words."""
    for separator in ("\n", " "):
        found = text.find(separator, offset, offset + 200)
        if found >= 0:
            return found + 1
    return offset


def lookup_document(rng: random.Random, task: str, filler: str, encoder: Encoder, max_tokens: int) -> str:
    """One document of `task` whose tokens (plus its EOS) fit in `max_tokens`."""
    needles = needle_task(rng, task)
    tail = f"\n{needles.question} {needles.answer_text}"
    fixed = sum(len(ids) for ids in encoder.encode([f"\n{line}\n" for line in needles.needles] + [tail]))
    if fixed + 1 >= max_tokens:
        raise DataError(f"a {task} look-up needs {fixed + 1} tokens without filler; the samples hold {max_tokens}")
    chars = int((max_tokens - 1 - fixed) * CHARS_PER_TOKEN)
    while True:
        start = _snap(filler, rng.randrange(max(1, len(filler) - chars)))
        span = filler[start : start + chars]
        cuts = sorted(_snap(span, rng.randrange(len(span) + 1)) for _ in needles.needles)
        parts, previous = [], 0
        for cut, line in zip(cuts, needles.needles, strict=True):
            parts += [span[previous:cut].rstrip("\n"), f"\n{line}\n"]
            previous = cut
        text = "".join([*parts, span[previous:].rstrip("\n"), tail]).lstrip("\n")
        if len(encoder.encode([text])[0]) + 1 <= max_tokens or chars == 0:
            return text
        chars = int(chars * SHRINK)


def build_lookup(corpus: Path, documents: int, seed: int = 0) -> dict[str, object]:
    """Writes `documents` look-up documents into corpus/raw/train/lookup.jsonl and tokenizes them into
    corpus/train/lookup (a source like the corpus's own, same tokenizer and sequence length); returns the manifest."""
    summary_path = corpus / "corpus.json"
    if not summary_path.is_file():
        raise DataError(f"{summary_path}: no corpus here; build it first (nopetrain-data build-default)")
    if documents <= 0:
        raise DataError(f"--documents={documents} must be positive")
    summary = json.loads(summary_path.read_text())
    tokenizer = str(corpus / summary["tokenizer"]["path"])
    seq_len = summary["seq_len"]
    filler = "\n".join(
        json.loads(line)["text"]
        for name in FILLER_SOURCES
        for line in (corpus / "raw" / "train" / f"{name}.jsonl").read_text().splitlines()
    )
    encoder = load(describe(tokenizer))
    rng = random.Random(f"lookup-{seed}")
    texts = [lookup_document(rng, rng.choice(NIAH_TASKS), filler, encoder, seq_len + 1) for _ in range(documents)]
    raw = corpus / "raw" / "train" / "lookup.jsonl"
    write_bytes(raw, "".join(json.dumps({"text": text}) + "\n" for text in texts).encode("utf-8"))
    return tokenize([str(raw)], tokenizer, corpus / "train", "lookup", seq_len)
