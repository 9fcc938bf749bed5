"""Synthetic look-up training documents: the long-context evaluation's needle tasks at a length the model trains at.

A document is filler prose (lines of the web source's raw text) with the needle lines of one task between its lines
at random depths, then the question and its answer, laid out exactly as the evaluation's prompts, e.g.

    ...filler...
    key: amber falcon, value: 4829301
    ...filler...
    Question: what is the value of the key amber falcon?
    Answer: 4829301

The needles, questions and answers come from `lookup_text.needle_task`, the same text the evaluation hides
in held-out text at 2-8x the training context. Training on them makes retrieval learnable within the context at tiny
scale, so the evaluation measures what happens beyond it. Each document fits one training sample with its EOS and is
tokenized with `whole_documents`, so packing never separates a question from its needles.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from nopetrain.atomic import write_bytes

from .encoders import Encoder, describe, load
from .errors import DataError
from .lookup_text import NIAH_TASKS, needle_task, prompt_text, prose_lines
from .tokenize_source import tokenize

# Filler is prose (the web source), as the evaluation's haystacks are.
FILLER_SOURCES = ("web",)
# Bytes of look-up text in the tokenizer's training sample (tokenizer_lookup_text): about what the math source held
# when its documents included look-ups, so that needles and questions keep the pieces they had.
TOKENIZER_LOOKUP_BYTES = 300_000
# Characters per token to start from when sizing the filler; a document that encodes too long is cut down.
CHARS_PER_TOKEN = 4.0
SHRINK = 0.85


def _line_start(text: str, offset: int) -> int:
    """The offset of the first line that starts at or after `offset` (0 if none does)."""
    found = text.find("\n", offset)
    return found + 1 if found >= 0 else 0


def lookup_document(
    rng: random.Random, task: str, filler: str, encoder: Encoder, max_tokens: int, value_digits: int = 7
) -> str:
    """One document of `task` whose tokens (plus its EOS) fit in `max_tokens`: a line of `filler`, then lines of it
    laid out with the task's needles at random depths and its question exactly as in the evaluation's prompts
    (`lookup_text.prompt_text`, as the evaluation's `niah.build_prompt` lays them out), then the answer. The filler's
    length is drawn uniformly up to what fits, so that training sees every distance between needle and question up
    to the context, short ones (which teach the look-up fastest) as often as long ones. Values have
    `value_digits` digits."""
    needles = needle_task(rng, task, value_digits=value_digits)
    depths = [rng.random() for _ in needles.needles]
    answer = f" {needles.answer_text}"
    fixed = len(encoder.encode(["\n" + prompt_text(needles, "", depths) + answer])[0])
    if fixed + 1 >= max_tokens:
        raise DataError(f"a {task} look-up needs {fixed + 1} tokens without filler; the samples hold {max_tokens}")
    chars = int(rng.uniform(0, max_tokens - 1 - fixed) * CHARS_PER_TOKEN)
    while True:
        start = _line_start(filler, rng.randrange(max(1, len(filler) - chars)))
        span = filler[start : start + chars]
        # Whole lines; the first leads in, so that no needle opens the document (where the tokenizer would write
        # its first word differently), as in the evaluation's prompts.
        lead, _, body = span[: span.rfind("\n") if start + chars < len(filler) else len(span)].partition("\n")
        text = "\n".join([lead, prompt_text(needles, body, depths)]) + answer
        if len(encoder.encode([text])[0]) + 1 <= max_tokens or chars == 0:
            return text
        chars = int(chars * SHRINK)


def tokenizer_lookup_text(seed: int, max_bytes: int = TOKENIZER_LOOKUP_BYTES) -> list[str]:
    """Documents of look-up text alone (every task's needle lines, then its question and answer), for the tokenizer's
    training sample: the look-up source is written only once the tokenizer exists, and no other source holds the
    text its needles and questions are made of."""
    rng = random.Random(f"tokenizer-lookup-{seed}")
    texts: list[str] = []
    size = 0
    while size < max_bytes:
        task = needle_task(rng, rng.choice(NIAH_TASKS))
        texts.append("\n".join([*task.needles, f"{task.question} {task.answer_text}"]))
        size += len(texts[-1])
    return texts


def build_lookup(
    corpus: Path,
    documents: int,
    seed: int = 0,
    tasks: list[str] | None = None,
    value_digits: int = 7,
    seq_len: int | None = None,
    name: str = "lookup",
) -> dict[str, object]:
    """Writes `documents` look-up documents of `tasks` (default: every NIAH task), drawn uniformly, with values of
    `value_digits` digits, into corpus/raw/train/NAME.jsonl and tokenizes them into corpus/train/NAME (a source like
    the corpus's own, same tokenizer, packed at the corpus's sequence length or `seq_len`: a shorter one feeds a
    curriculum phase at that length); returns the manifest and records the settings as corpus.json's NAME."""
    summary_path = corpus / "corpus.json"
    if not summary_path.is_file():
        raise DataError(f"{summary_path}: no corpus here; build it first (nopetrain-data build-default)")
    if documents <= 0:
        raise DataError(f"--documents={documents} must be positive")
    if value_digits <= 0:
        raise DataError(f"--value-digits={value_digits} must be positive")
    tasks = list(tasks or NIAH_TASKS)
    unknown = [task for task in tasks if task not in NIAH_TASKS]
    if unknown:
        raise DataError(f"--tasks has {unknown[0]!r}; choose from {', '.join(NIAH_TASKS)}")
    summary = json.loads(summary_path.read_text())
    tokenizer = str(corpus / summary["tokenizer"]["path"])
    seq_len = seq_len or summary["seq_len"]
    filler = "\n".join(
        line
        for source in FILLER_SOURCES
        for record in (corpus / "raw" / "train" / f"{source}.jsonl").read_text().splitlines()
        for line in prose_lines(json.loads(record)["text"])
    )
    encoder = load(describe(tokenizer))
    rng = random.Random(f"{name}-{seed}")
    texts = [
        lookup_document(rng, rng.choice(tasks), filler, encoder, seq_len + 1, value_digits) for _ in range(documents)
    ]
    raw = corpus / "raw" / "train" / f"{name}.jsonl"
    write_bytes(raw, "".join(json.dumps({"text": text}) + "\n" for text in texts).encode("utf-8"))
    manifest = tokenize([str(raw)], tokenizer, corpus / "train", name, seq_len, whole_documents=True)
    # corpus.json says what was added, so that a runner asking for other look-ups can tell.
    summary[name] = {"documents": documents, "tasks": tasks, "seed": seed, "value_digits": value_digits}
    if seq_len != summary["seq_len"]:
        summary[name]["seq_len"] = seq_len
    write_bytes(summary_path, (json.dumps(summary, indent=2) + "\n").encode())
    return manifest
