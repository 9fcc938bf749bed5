"""Code for the default corpus: the Python standard library's own `.py` files, read as text, never imported."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

# Tests are most of the standard library's source and repeat themselves; codec tables are data, not code; the
# prose in pydoc_data belongs to the web source.
SKIPPED_DIRS = frozenset({"site-packages", "__pycache__", "test", "tests", "idle_test", "encodings", "pydoc_data"})


def python_files(root: str | os.PathLike[str]) -> list[Path]:
    """The `.py` files under `root`, in sorted order, outside SKIPPED_DIRS."""
    files: list[Path] = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if name not in SKIPPED_DIRS)
        files += [Path(folder, name) for name in sorted(names) if name.endswith(".py")]
    return files


def read_source(path: Path) -> str | None:
    """A file's text, or None for the few files that are not UTF-8 (encoding test fixtures) or unreadable."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def code_documents(files: Iterable[Path]) -> Iterator[str]:
    """One document per non-empty source file, in the order given."""
    for path in files:
        text = read_source(path)
        if text and text.strip():
            yield text
