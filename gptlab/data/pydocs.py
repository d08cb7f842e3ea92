"""The embedded default corpus, `python-docs`: text every Python installation already ships.

Two parts, in a fixed order so that the same Python gives the same corpus byte for byte:
1. the pydoc_data topics (the language reference pages that `help("with")` shows), sorted by name;
2. the docstrings of the standard library, one document per module (module docstring, then each class
   and function docstring in source order), modules sorted by path.

Docstrings are read with `ast` from the source files, never by importing: importing some modules has
side effects (`antigravity` opens a browser, `this` prints, `turtle`/`tkinter` open windows).
"""

from __future__ import annotations

import ast
import functools
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

NAME = "python-docs"

# packages left out: tests (fixtures and noise, not prose), GUI/IDLE code, and installed third-party code
_SKIP_TOP = {"site-packages", "dist-packages", "test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip"}


def stdlib_dir() -> Path:
    """The standard library's source dir of the running interpreter (not the venv)."""
    return Path(sysconfig.get_paths(vars={"base": sys.base_prefix, "installed_base": sys.base_prefix})["stdlib"])


def fingerprint() -> str:
    """Changes whenever the corpus would: the Python that supplies it."""
    return f"{NAME}:{sys.version.split()[0]}:{stdlib_dir()}"


def topics() -> Iterator[str]:
    from pydoc_data.topics import topics as table

    for name in sorted(table):
        text = table[name].strip()
        if text:
            yield text


def _module_docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return ""  # a file this Python cannot parse (e.g. a deliberately broken test fixture)
    docs: list[str] = []

    def visit(node: ast.AST) -> None:  # depth-first, source order
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                docs.append(doc.strip())
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child)

    visit(tree)
    return "\n\n".join(docs)


def stdlib_docstrings() -> Iterator[str]:
    root = stdlib_dir()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in _SKIP_TOP or "tests" in rel.parts or "test" in rel.parts:
            continue
        text = _module_docstrings(path)
        if text:
            yield text


@functools.lru_cache(maxsize=1)
def _gathered() -> tuple[str, ...]:
    # ~2 MB of text; kept so that training a tokenizer and then tokenizing parse the stdlib only once
    return (*topics(), *stdlib_docstrings())


def documents() -> Iterator[str]:
    """The corpus as documents (each is one training document, separated by <|endoftext|>)."""
    yield from _gathered()
