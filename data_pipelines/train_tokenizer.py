"""`train-tokenizer`: a sentencepiece model with byte fallback, trained on lines of the input documents.

Fixed ids: unk=0 (<unk>), bos=1 (<s>), eos=2 (</s>), pad=3 (<pad>), then the special tokens in the order given,
then the learned pieces and the 256 byte pieces. Text is not normalized (identity rule, spaces kept), so decoding
gives back the exact text, code indentation included; digits are split one per token, for arithmetic.

The same input files and flags give a byte-identical model: sentences are fed in file order without sampling, and
the thread count is a flag with a fixed default rather than the machine's core count, because unigram training
splits its work by thread and its result depends on the split.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

from nopetrain.atomic import write_bytes

from .errors import DataError, one_line
from .inputs import iter_documents, resolve_inputs

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
MODEL_TYPES = ("unigram", "bpe")
DEFAULT_THREADS = 4
# sentencepiece skips sentences over max_sentence_length bytes; long lines are cut to fit (4 bytes per char at most).
_MAX_LINE_CHARS = 4096


def training_sentences(files: list[str], text_field: str, max_bytes: float) -> Iterator[str]:
    """The non-blank lines of the documents, up to `max_bytes` of documents in all.

    Each file gets an equal share of what is left, so every file is sampled and a short file's unused share
    passes to the files after it.
    """
    remaining = max_bytes
    for index, path in enumerate(files):
        share = remaining / (len(files) - index)
        used = 0
        for document in iter_documents(path, text_field):
            for line in document.splitlines():
                if line.strip():
                    yield from (line[i : i + _MAX_LINE_CHARS] for i in range(0, len(line), _MAX_LINE_CHARS))
            used += len(document.encode("utf-8"))
            if used >= share:
                break
        remaining -= used


def train_tokenizer(
    inputs: list[str],
    output: Path,
    vocab_size: int,
    model_type: str = "unigram",
    special_tokens: tuple[str, ...] = (),
    max_mb: float = 100.0,
    text_field: str = "text",
    threads: int = DEFAULT_THREADS,
) -> Path:
    """Trains on `inputs` and writes `output/tokenizer.model` and `output/tokenizer.vocab`; returns the model path."""
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise DataError(f"--model-type={model_type!r} must be one of {', '.join(MODEL_TYPES)}")
    for flag, value in (("--vocab-size", vocab_size), ("--max-mb", max_mb), ("--threads", threads)):
        if value <= 0:
            raise DataError(f"{flag}={value} must be positive")
    # Read before training starts, so that an input error surfaces as itself rather than inside sentencepiece's.
    sentences = list(training_sentences(resolve_inputs(inputs), text_field, max_mb * 1e6))
    model = io.BytesIO()
    try:
        # model_writer, not model_prefix: sentencepiece stores the prefix in the model, which would tie its bytes
        # to the output folder.
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            character_coverage=0.9995,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            user_defined_symbols=list(special_tokens),
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=4 * _MAX_LINE_CHARS,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=threads,
            minloglevel=2,
        )
    except RuntimeError as exc:  # e.g. a vocabulary larger than the input can fill
        raise DataError(f"sentencepiece training failed: {one_line(exc)}") from exc
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = "".join(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n" for i in range(len(processor)))
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    write_bytes(output / "tokenizer.model", model.getvalue())
    write_bytes(output / "tokenizer.vocab", vocab.encode("utf-8"))
    return output / "tokenizer.model"
