"""English prose for the default corpus, from what Python and its installed packages ship, with no download.

Three kinds, in this order: the help topics of `pydoc_data.topics` (the language reference's prose), the long
descriptions of installed distributions (their READMEs, from `importlib.metadata`), and docstrings read with `ast`
from source files, so that no module is imported (importing arbitrary modules can have side effects).
"""

from __future__ import annotations

import ast
import importlib.metadata
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from .corpus_code import read_source

# Shorter docstrings ("Return self.") and descriptions (a one-line summary) are not prose worth having.
MIN_DOCSTRING_CHARS = 80
MIN_DESCRIPTION_CHARS = 200
# Distributions whose text would change with this repository's own edits.
EXCLUDED_DISTRIBUTIONS = frozenset({"nopetrain"})


def topic_documents() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name].strip()


def package_descriptions() -> Iterator[str]:
    """Each installed distribution's long description, titled with its name and summary, in name order."""
    seen = set(EXCLUDED_DISTRIBUTIONS)
    metadata = (dist.metadata.json for dist in importlib.metadata.distributions())
    for meta in sorted(metadata, key=lambda meta: meta.get("name", "").lower()):
        name = meta.get("name", "")
        description = meta.get("description", "").strip()
        if name.lower() in seen or len(description) < MIN_DESCRIPTION_CHARS:
            continue
        seen.add(name.lower())
        yield f"{name}: {meta.get('summary', '')}\n\n{description}"


def module_docstrings(source: str) -> str:
    """A module's docstrings (module, classes, functions) of MIN_DOCSTRING_CHARS or more, each under its name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SyntaxWarning for odd escapes in old code
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            return ""
    sections = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node)
            if docstring and len(docstring) >= MIN_DOCSTRING_CHARS:
                title = "" if isinstance(node, ast.Module) else f"{node.name}\n\n"
                sections.append(title + docstring)
    return "\n\n".join(sections)


def docstring_documents(files: Iterable[Path]) -> Iterator[str]:
    """One document per source file that has docstrings worth keeping."""
    for path in files:
        source = read_source(path)
        text = module_docstrings(source) if source else ""
        if text:
            yield text


def web_documents(docstring_files: Iterable[Path]) -> Iterator[str]:
    yield from topic_documents()
    yield from package_descriptions()
    yield from docstring_documents(docstring_files)
