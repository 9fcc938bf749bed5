"""Input documents: resolving paths, globs and URLs, and reading text, JSONL and Parquet files.

Formats follow the file name: `*.parquet` is Parquet (one document per row of the text column); `*.jsonl` is JSON
Lines (one document per line, from the text field); anything else is a text file that holds one document. JSONL and
text files may be compressed, `.gz` or `.zst`. Empty documents are skipped; a file with none is an error. URLs
(`scheme://...`) are read with fsspec, imported only when one is given, so that local use does not need it.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator
from types import ModuleType
from typing import IO

from .errors import DataError, one_line


def is_url(spec: str) -> bool:
    return "://" in spec


def _fsspec(url: str) -> ModuleType:
    try:
        import fsspec
    except ImportError as exc:
        raise DataError(f"{url}: reading URLs needs fsspec (pip install fsspec)") from exc
    return fsspec


def resolve_inputs(specs: list[str]) -> list[str]:
    """Expands each path, glob or URL into files, in the order given (glob matches sorted); raises on none."""
    files: list[str] = []
    for spec in specs:
        if is_url(spec):
            files += _resolve_url(spec)
        elif glob.has_magic(spec):
            matches = sorted(path for path in glob.glob(spec, recursive=True) if os.path.isfile(path))
            if not matches:
                raise DataError(f"{spec}: no files match")
            files += matches
        elif os.path.isdir(spec):
            raise DataError(f"{spec}: is a directory; give files or a glob such as {spec}/*.jsonl")
        elif not os.path.isfile(spec):
            raise DataError(f"{spec}: no such file")
        else:
            files.append(spec)
    return files


def _resolve_url(url: str) -> list[str]:
    fsspec = _fsspec(url)
    try:
        fs, path = fsspec.core.url_to_fs(url)
        matches = sorted(fs.glob(path)) if glob.has_magic(path) else [path] if fs.isfile(path) else []
    except (ImportError, OSError, ValueError) as exc:  # a missing backend or an unreachable store
        raise DataError(f"{url}: {one_line(exc)}") from exc
    if not matches:
        raise DataError(f"{url}: no files match")
    return [fs.unstrip_protocol(match) for match in matches]


def _open_binary(path: str) -> IO[bytes]:
    if not is_url(path):
        return open(path, "rb")
    try:
        return _fsspec(path).open(path, "rb").open()
    except (ImportError, OSError, ValueError) as exc:
        raise DataError(f"{path}: {one_line(exc)}") from exc


def _decompressed(path: str, raw: IO[bytes]) -> IO[bytes]:
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if path.endswith(".zst"):
        return io.BufferedReader(_ZstdFrames(path, raw), buffer_size=1 << 20)
    return raw


class _ZstdFrames(io.RawIOBase):
    """Decompresses zstd frames one after another. zstandard's own stream_reader ends quietly partway through a
    truncated file; this raises, so that a cut-off download cannot pass for a shorter corpus."""

    def __init__(self, path: str, raw: IO[bytes]) -> None:
        import zstandard  # only .zst inputs need it

        self._path, self._raw, self._zstd = path, raw, zstandard
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._fed = False  # whether the current frame has had input
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        while not self._out:
            data = self._raw.read(1 << 20)
            if not data:
                if self._fed and not self._frame.eof:
                    raise DataError(f"{self._path}: zstd data ends inside a frame (truncated file)")
                return 0
            self._out = memoryview(self._decompress(data))
        size = min(len(buffer), len(self._out))
        buffer[:size] = self._out[:size]
        self._out = self._out[size:]
        return size

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._frame.eof:  # the next frame starts in what the last one left over
                self._frame = self._zstd.ZstdDecompressor().decompressobj()
            try:
                out.append(self._frame.decompress(data))
            except self._zstd.ZstdError as exc:
                raise DataError(f"{self._path}: not zstd data ({one_line(exc)})") from exc
            self._fed = True
            data = self._frame.unused_data if self._frame.eof else b""
        return b"".join(out)


def iter_documents(path: str, text_field: str = "text") -> Iterator[str]:
    """Yields the non-empty documents of one file; raises DataError naming the file (and line or row)."""
    count = 0
    with _open_binary(path) as raw:
        name = path.removesuffix(".gz").removesuffix(".zst")
        if name.endswith(".parquet"):
            documents = _parquet_documents(path, raw, text_field)
        else:
            stream = _decompressed(path, raw)
            documents = _jsonl_documents(path, stream, text_field) if name.endswith(".jsonl") else _text(path, stream)
        try:
            for text in documents:
                if text:
                    count += 1
                    yield text
        except (OSError, EOFError) as exc:  # truncated or corrupt compressed data
            raise DataError(f"{path}: {one_line(exc)}") from exc
    if count == 0:
        raise DataError(f"{path}: no documents (empty source)")


def _text(path: str, stream: IO[bytes]) -> Iterator[str]:
    try:
        yield stream.read().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _jsonl_documents(path: str, stream: IO[bytes], text_field: str) -> Iterator[str]:
    for lineno, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}:{lineno}: not a JSON line ({one_line(exc)})") from exc
        if not isinstance(record, dict) or text_field not in record:
            raise DataError(f"{path}:{lineno}: no field {text_field!r} (set --text-field)")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string")
        yield text


def _parquet_documents(path: str, raw: IO[bytes], text_field: str) -> Iterator[str]:
    import pyarrow as pa  # only Parquet inputs need it
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(raw)
    except pa.ArrowException as exc:
        raise DataError(f"{path}: not a Parquet file ({one_line(exc)})") from exc
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}; set --text-field)")
    column_type = parquet.schema_arrow.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise DataError(f"{path}: column {text_field!r} is {column_type}, not a string")
    row = 0
    for batch in parquet.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is None:
                raise DataError(f"{path}: row {row}: column {text_field!r} is null")
            row += 1
            yield text
