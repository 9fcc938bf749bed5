"""Cutting the concatenated token stream into fixed-length chunks, with the offsets where documents begin."""

from __future__ import annotations

import numpy as np


class Packer:
    """Accumulates documents' tokens (EOS included) and hands back every complete chunk of `length` tokens.

    A chunk's starts are the offsets within it at which a document begins: 0 when one begins exactly at the chunk's
    first token, and the position after each EOS that is not the chunk's last token. Tokens left over at the end
    (fewer than `length`) are `remainder`, which the caller drops.

    With `pad_id` set (whole documents), a document that fits in one chunk but not in the rest of the current one
    starts the next chunk instead: the rest is filled with `pad_id` tokens, each its own one-token document, so the
    loader's document masking takes no loss on them and attends nothing across them. Documents longer than a chunk
    are still split (counted in `split_documents`).
    """

    def __init__(self, length: int, pad_id: int | None = None) -> None:
        self.length = length
        self.pad_id = pad_id
        self.padding_tokens = 0
        self.split_documents = 0
        self._tokens = np.empty(0, dtype=np.uint32)
        self._starts = np.empty(0, dtype=np.int64)  # document starts, as offsets into self._tokens

    @property
    def remainder(self) -> int:
        return len(self._tokens)

    def _pad_whole(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The documents with padding inserted before each one that would straddle a chunk boundary."""
        pieces, lengths = [], []
        fill, offset = len(self._tokens) % self.length, 0
        for doc_length in doc_lengths.tolist():
            room = self.length - fill
            if doc_length > self.length:
                self.split_documents += 1
            elif doc_length > room:
                pieces.append(np.full(room, self.pad_id, dtype=np.uint32))
                lengths += [1] * room
                self.padding_tokens += room
                fill = 0
            pieces.append(tokens[offset : offset + doc_length])
            lengths.append(doc_length)
            offset += doc_length
            fill = (fill + doc_length) % self.length
        return np.concatenate(pieces) if pieces else tokens, np.asarray(lengths, dtype=np.int64)

    def add(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Appends documents (their tokens back to back, with lengths) and returns the chunks now complete."""
        if self.pad_id is not None:
            tokens, doc_lengths = self._pad_whole(tokens, doc_lengths)
        doc_starts = np.concatenate(([0], np.cumsum(doc_lengths[:-1]))).astype(np.int64) + len(self._tokens)
        self._tokens = np.concatenate((self._tokens, tokens))
        self._starts = np.concatenate((self._starts, doc_starts))
        count = len(self._tokens) // self.length
        # bounds[i] indexes the first document that starts at or after chunk i's first token.
        bounds = np.searchsorted(self._starts, np.arange(count + 1) * self.length)
        chunks = [
            (
                self._tokens[i * self.length : (i + 1) * self.length],
                (self._starts[bounds[i] : bounds[i + 1]] - i * self.length).astype(np.int32),
            )
            for i in range(count)
        ]
        consumed = count * self.length
        self._tokens = self._tokens[consumed:].copy()  # a copy, so the chunks' views do not pin this buffer
        self._starts = self._starts[bounds[count] :] - consumed
        return chunks
