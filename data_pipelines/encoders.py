"""Tokenizers behind one interface: our sentencepiece `.model` or a Hugging Face `tokenizer.json`.

`describe()` reads a tokenizer once in the main process (kind, hash, vocabulary size, EOS id) into a small
picklable `TokenizerInfo`; workers then call `load()` on it. The EOS id ends every document in the token stream.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from .errors import DataError, one_line

# Names Hugging Face tokenizers give their end-of-text token, tried in order when no tokenizer_config.json says.
HF_EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[EOS]")


class Encoder(Protocol):
    def encode(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class TokenizerInfo:
    kind: str  # "sentencepiece" or "hf"
    path: str
    sha256: str
    vocab_size: int
    eos_id: int

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _kind(path: str) -> str:
    if path.endswith(".model"):
        return "sentencepiece"
    if path.endswith(".json"):
        return "hf"
    raise DataError(f"--tokenizer={path}: expected a sentencepiece .model or a Hugging Face tokenizer.json")


def describe(path: str, eos_token: str | None = None) -> TokenizerInfo:
    """Reads a tokenizer's kind, hash, vocabulary size and EOS id; `eos_token` overrides the EOS it declares."""
    kind = _kind(path)
    if not os.path.isfile(path):
        raise DataError(f"--tokenizer={path}: no such file")
    if kind == "sentencepiece":
        processor = _SentencePiece(path).processor
        vocab_size = processor.get_piece_size()
        eos_id = processor.eos_id() if eos_token is None else processor.piece_to_id(eos_token)
        # piece_to_id answers unk for an unknown piece, so an EOS equal to unk means "not found".
        found = eos_id >= 0 and (eos_token is None or eos_id != processor.unk_id())
    else:
        tokenizer = _HuggingFace(path).tokenizer
        vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        names = (eos_token,) if eos_token is not None else (*_hf_config_eos(path), *HF_EOS_NAMES)
        ids = [tokenizer.token_to_id(name) for name in names]
        eos_id = next((i for i in ids if i is not None), -1)
        found = eos_id >= 0
    if not found and eos_token is not None:
        raise DataError(f"--eos-token={eos_token}: not a token of --tokenizer={path}")
    if not found:
        raise DataError(f"--tokenizer={path}: declares no end-of-text token; name it with --eos-token")
    return TokenizerInfo(kind, path, sha256_file(path), vocab_size, eos_id)


def _hf_config_eos(path: str) -> tuple[str, ...]:
    """The eos_token of a tokenizer_config.json beside tokenizer.json, as Hugging Face repositories ship it."""
    config = Path(path).with_name("tokenizer_config.json")
    if not config.is_file():
        return ()
    try:
        eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
    except (ValueError, AttributeError) as exc:  # not JSON, or not an object
        raise DataError(f"{config}: not a tokenizer config ({one_line(exc)})") from exc
    if isinstance(eos, dict):  # older configs store an AddedToken
        eos = eos.get("content")
    return (eos,) if isinstance(eos, str) else ()


class _SentencePiece:
    def __init__(self, path: str) -> None:
        import sentencepiece as spm

        try:
            self.processor = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as exc:
            raise DataError(f"--tokenizer={path}: not a sentencepiece model ({one_line(exc)})") from exc

    def encode(self, texts: list[str]) -> list[list[int]]:
        # One thread: parallelism comes from worker processes, one per core.
        return self.processor.encode(texts, num_threads=1)

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)


class _HuggingFace:
    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(path)
        except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
            raise DataError(f"--tokenizer={path}: not a Hugging Face tokenizer.json ({one_line(exc)})") from exc

    def encode(self, texts: list[str]) -> list[list[int]]:
        # No special tokens: the stream adds EOS itself, and a template's BOS/EOS would double it.
        return [encoding.ids for encoding in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def load(info: TokenizerInfo) -> Encoder:
    return _SentencePiece(info.path) if info.kind == "sentencepiece" else _HuggingFace(info.path)
