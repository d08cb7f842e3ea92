"""Corpora as streams of text: files, folders of them, JSONL files with a text field, or the embedded
`python-docs` (gptlab/data/pydocs.py).

Text streams in pieces of about PIECE_CHARS characters cut at line ends, each flagged when it ends a
document (a whole text file, or one JSONL row), so a corpus larger than memory works.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from gptlab.data import pydocs
from gptlab.data.jsonl import read_jsonl
from gptlab.errors import GptlabError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".jsonl"}
PIECE_CHARS = 4096  # text is tokenized and assigned to a split in pieces of about this many characters


def corpus_files(corpus: str | Path) -> list[Path]:
    """The files a corpus path names: the file itself, or every text/JSONL file under a folder."""
    p = Path(corpus).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise GptlabError(f"folder {p} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
        return files
    raise GptlabError(f"corpus {corpus} does not exist (give a file, a folder, or 'python-docs')")


def _pieces(text: str) -> Iterator[str]:
    """Split a document at line ends into pieces of at most ~PIECE_CHARS (a long line is cut at a space)."""
    start, n = 0, len(text)
    while start < n:
        end = start + PIECE_CHARS
        if end >= n:
            yield text[start:]
            return
        cut = text.rfind("\n", start, end)
        if cut <= start:
            cut = text.rfind(" ", start, end)
        end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end


def _read_text_file(path: Path) -> Iterator[tuple[str, bool]]:
    """(piece, ends_document) pieces of one text file, streamed; the whole file is one document."""
    buf: list[str] = []
    size = 0
    seen_text = False
    try:
        with open(path, encoding="utf-8", newline="") as f:
            for line in f:
                seen_text = seen_text or bool(line.strip())
                buf.append(line)
                size += len(line)
                if size >= 16 * PIECE_CHARS:
                    chunk = "".join(buf)
                    buf, size = [], 0
                    yield from ((piece, False) for piece in _pieces(chunk))
    except UnicodeDecodeError as e:
        raise GptlabError(f"{path} is not UTF-8 text (invalid byte at offset {e.start} of a read block); "
                          f"convert it to UTF-8 first") from None
    if not seen_text:
        raise GptlabError(f"{path} is empty (no text to train on)")
    pieces = list(_pieces("".join(buf))) or [""]
    for i, piece in enumerate(pieces):
        yield piece, i == len(pieces) - 1


def _read_jsonl_texts(path: Path, field: str) -> Iterator[tuple[str, bool]]:
    """Each line's `field` is one document."""
    n_docs = 0
    for lineno, row in read_jsonl(path):
        if field not in row:
            raise GptlabError(f"{path}:{lineno}: has no {field!r} field (choose one with --text-field)")
        text = row[field]
        if not isinstance(text, str):
            raise GptlabError(f"{path}:{lineno}: field {field!r} is not a string")
        if not text.strip():
            continue
        n_docs += 1
        pieces = list(_pieces(text))
        for i, piece in enumerate(pieces):
            yield piece, i == len(pieces) - 1
    if n_docs == 0:
        raise GptlabError(f"{path} is empty (no non-empty {field!r} values)")


def read_corpus(corpus: str | Path | Iterable[str | Path], text_field: str = "text") -> Iterator[tuple[str, bool]]:
    """Stream a corpus as (piece of text, ends_document) pairs, in a deterministic order."""
    names = [corpus] if isinstance(corpus, (str, Path)) else list(corpus)
    for name in names:
        if str(name) == pydocs.NAME:
            for doc in pydocs.documents():
                pieces = list(_pieces(doc))
                for i, piece in enumerate(pieces):
                    yield piece, i == len(pieces) - 1
            continue
        for path in corpus_files(name):
            if path.suffix.lower() == ".jsonl":
                yield from _read_jsonl_texts(path, text_field)
            else:
                yield from _read_text_file(path)


def corpus_texts(corpus: str | Path | Iterable[str | Path], text_field: str = "text") -> Iterator[str]:
    """The corpus as a stream of text pieces (what the tokenizer trainer reads)."""
    return (piece for piece, _ in read_corpus(corpus, text_field))


def corpus_fingerprint(corpus: str | Path | Iterable[str | Path]) -> str:
    """Changes when the corpus may have: names, sizes and modification times of its files."""
    names = [corpus] if isinstance(corpus, (str, Path)) else list(corpus)
    h = hashlib.sha256()
    for name in names:
        if str(name) == pydocs.NAME:
            h.update(pydocs.fingerprint().encode())
            continue
        for f in corpus_files(name):
            st = f.stat()
            h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
