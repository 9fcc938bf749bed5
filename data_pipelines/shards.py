"""Writing samples into webdataset tar shards whose bytes depend only on their content.

Every member gets mtime 0, uid/gid 0, empty user and group names and mode 0o444, and samples go in key order
(`starts` before `tokens` within one), so the same tokens give byte-identical shards on every run and machine.
The bytes are those that `tarfile.open(format=tarfile.USTAR_FORMAT)` writes for such members (a test holds them
to it); they are assembled here because tarfile's per-member overhead made it most of the tokenize time.
"""

from __future__ import annotations

import hashlib
import io
from functools import cache
from pathlib import Path

import numpy as np

BLOCK = 512
RECORD = 20 * BLOCK  # tarfile pads an archive to whole records


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header of a regular file with mode 0o444, owner 0:0 and mtime 0."""
    header = b"".join(
        (
            name.encode("ascii").ljust(100, b"\0"),
            b"0000444\0",  # mode
            b"0000000\0",  # uid
            b"0000000\0",  # gid
            b"%011o\0" % size,
            b"00000000000\0",  # mtime
            b" " * 8,  # checksum, counted as spaces while it is computed
            b"0",  # regular file
            b"\0" * 100,  # link name
            b"ustar\x0000",  # magic and version
            b"\0" * 64,  # user and group names
            b"\0" * 16,  # device major and minor, empty for a regular file
            b"\0" * 167,  # name prefix and padding
        )
    )
    return header[:148] + b"%06o\0 " % sum(header) + header[156:]


@cache
def _npy_header(dtype: np.dtype, length: int) -> bytes:
    """np.save's header for a 1-D array; computed once per shape, since np.save itself was slow per sample."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(length, dtype=dtype), allow_pickle=False)
    return buffer.getvalue()[: -length * dtype.itemsize or None]


def npy_bytes(array: np.ndarray) -> bytes:
    """What np.save writes for a 1-D array."""
    return _npy_header(array.dtype, len(array)) + np.ascontiguousarray(array).tobytes()


class ShardWriter:
    """Writes `DIR/NAME-000000.tar`, ... with `samples_per_shard` samples each; `close()` returns their records."""

    def __init__(self, directory: Path, name: str, samples_per_shard: int, sample_tokens: int, dtype: np.dtype) -> None:
        self.directory, self.name = directory, name
        self.samples_per_shard, self.sample_tokens, self.dtype = samples_per_shard, sample_tokens, dtype
        self.records: list[dict[str, object]] = []
        self._parts: list[bytes] = []
        self._samples = 0

    def _add_member(self, name: str, data: bytes) -> None:
        self._parts += (ustar_header(name, len(data)), data, b"\0" * (-len(data) % BLOCK))

    def add(self, tokens: np.ndarray, starts: np.ndarray) -> None:
        key = f"{len(self.records):06d}-{self._samples:07d}"
        self._add_member(f"{key}.starts.npy", npy_bytes(starts.astype(np.int32)))
        self._add_member(f"{key}.tokens.npy", npy_bytes(tokens.astype(self.dtype)))
        self._samples += 1
        if self._samples == self.samples_per_shard:
            self._flush()

    def _flush(self) -> None:
        size = sum(map(len, self._parts)) + 2 * BLOCK  # two zero blocks end the archive
        data = b"".join(self._parts) + b"\0" * (2 * BLOCK + -size % RECORD)
        path = f"{self.name}-{len(self.records):06d}.tar"
        (self.directory / path).write_bytes(data)
        self.records.append(
            {
                "path": path,
                "samples": self._samples,
                "tokens": self._samples * self.sample_tokens,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
        self._parts, self._samples = [], 0

    def close(self) -> list[dict[str, object]]:
        """Writes the last, partly filled shard (if any sample is in it) and returns one record per shard."""
        if self._samples:
            self._flush()
        return self.records
