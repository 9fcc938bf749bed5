"""Writing outputs so that a failed run leaves what an earlier run wrote as it was: files and folders appear whole
or not at all. Standard library only, so that every layer can use it, the torch-free data pipelines included."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_directory(final: Path) -> Iterator[Path]:
    """Yields a staging folder beside `final` that replaces it only if the block succeeds; else it is removed."""
    staging = final.with_name(f".{final.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)  # left by a run that was killed
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = final.with_name(f".{final.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        final.rename(previous)
    staging.rename(final)
    shutil.rmtree(previous, ignore_errors=True)


def write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Writes a file under a temporary name (with `mode`, if given) and renames it, so readers never see half of
    it."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    if mode is not None:
        partial.chmod(mode)
    os.replace(partial, path)
