"""Documents in, pages out: the units a teacher writes question-answer pairs about, each with its source.

    .txt .md     split at Markdown headings ("# ...", "## ..."); each section keeps its heading as `where`
    .pdf         one page each (pypdf's text extraction); `where` is "page N"
    .jsonl       one row each, the `text` field (`title` or `source`, when present, names it)
    a folder     every file above in it, in sorted order

A section or page longer than `chunk_chars` is cut at paragraph, then sentence, boundaries into chunks of
at most that size (a longer sentence alone is cut hard), numbered "... (part 2)". Every document is read
before any teacher call, so an unreadable or empty one is an error before anything is spent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gptlab.errors import GptlabError

SUFFIXES = (".txt", ".md", ".pdf", ".jsonl")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# sentence ends: Latin . ! ? followed by space, or the CJK full stops (no space follows them)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？；])")


@dataclass(frozen=True)
class Page:
    """One unit of text the teacher sees: where it came from, and its language ("en" or "zh")."""

    source: str  # the file as given
    where: str  # "page 3", the section heading, or "line 12"
    text: str
    language: str

    @property
    def ref(self) -> str:
        return f"{self.source} ({self.where})"


def language_of(text: str) -> str:
    """"zh" when CJK ideographs are at least a quarter of the non-space characters, else "en"."""
    chars = [c for c in text if not c.isspace()]
    return "zh" if chars and len(_CJK.findall(text)) >= 0.25 * len(chars) else "en"


def chunks(text: str, limit: int) -> list[str]:
    """`text` in pieces of at most `limit` characters, cut at blank lines, then sentence ends."""
    pieces: list[str] = []
    current = ""
    for para in re.split(r"\n\s*\n", text.strip()):
        units = [para] if len(para) <= limit else [s for s in _SENTENCE_END.split(para) if s.strip()]
        for unit in units:
            while len(unit) > limit:  # one sentence longer than a chunk: cut it hard
                if current:
                    pieces.append(current)
                    current = ""
                pieces.append(unit[:limit])
                unit = unit[limit:]
            joiner = "\n\n" if unit is para else ("" if language_of(unit) == "zh" else " ")
            if current and len(current) + len(joiner) + len(unit) > limit:
                pieces.append(current)
                current = ""
            current = current + joiner + unit if current else unit
    if current.strip():
        pieces.append(current)
    return [p.strip() for p in pieces if p.strip()]


def _sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) of each Markdown section; text before the first heading is "start"."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)  # Markdown comments are not content
    marks = list(_HEADING.finditer(text))
    out = []
    head = text[: marks[0].start()] if marks else text
    if head.strip():
        out.append(("start", head))
    for i, m in enumerate(marks):
        body = text[m.end(): marks[i + 1].start() if i + 1 < len(marks) else len(text)]
        if body.strip():
            out.append((m.group(2).strip(), m.group(2).strip() + "\n" + body.strip()))
    return out


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GptlabError(f"{path}: not UTF-8 text (invalid byte at offset {e.start}); convert it to UTF-8") from None
    except OSError as e:
        raise GptlabError(f"cannot read {path}: {e.strerror}") from None


def _pdf_pages(path: Path) -> list[tuple[str, str]]:
    import logging

    from pypdf import PdfReader

    log = logging.getLogger("pypdf")
    level = log.level
    log.setLevel(logging.ERROR)  # its repair notes ("EOF marker not found") are not for the user; errors are
    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted:
            raise GptlabError(f"{path}: the PDF is encrypted; decrypt it first")
        pages = [(f"page {i}", page.extract_text() or "") for i, page in enumerate(reader.pages, 1)]
    except GptlabError:
        raise
    except Exception as e:  # noqa: BLE001 - PyPdfError and whatever else the parser meets in an untrusted file
        raise GptlabError(f"{path}: not a readable PDF ({type(e).__name__}: {e})") from None
    finally:
        log.setLevel(level)
    if pages and not any(t.strip() for _, t in pages):
        raise GptlabError(f"{path}: none of its {len(pages)} pages has extractable text (a scanned PDF needs OCR first)")
    return pages


def _jsonl_rows(path: Path) -> list[tuple[str, str]]:
    from gptlab.data.jsonl import read_jsonl

    out = []
    for n, row in read_jsonl(path):
        text = row.get("text")
        if not isinstance(text, str):
            raise GptlabError(f"{path}:{n}: expected a string field 'text' (found keys: {', '.join(sorted(row)) or 'none'})")
        name = row.get("title") or row.get("source")
        out.append((f"{name} (line {n})" if isinstance(name, str) and name else f"line {n}", text))
    return out


def _files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for spec in paths:
        p = Path(spec)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
            if not found:
                raise GptlabError(f"{p}: no {', '.join(SUFFIXES)} files in this folder")
            files.extend(found)
        elif p.is_file():
            if p.suffix.lower() not in SUFFIXES:
                raise GptlabError(f"{p}: unsupported document type {p.suffix or '(none)'!r} (read: {', '.join(SUFFIXES)})")
            files.append(p)
        else:
            raise GptlabError(f"document {p} does not exist")
    return files


def read_documents(paths: list[str], chunk_chars: int = 3000, language: str = "auto") -> list[Page]:
    """Every page of every document, chunked; an unreadable or empty document is an error naming it."""
    if not paths:
        raise GptlabError("name at least one document (.txt, .md, .pdf, .jsonl) or folder")
    if language not in ("auto", "en", "zh"):
        raise GptlabError(f"--language must be auto, en or zh, got {language!r}")
    pages: list[Page] = []
    for f in _files(paths):
        suffix = f.suffix.lower()
        parts = (_pdf_pages(f) if suffix == ".pdf" else _jsonl_rows(f) if suffix == ".jsonl"
                 else _sections(_read_text(f)))
        parts = [(w, t) for w, t in parts if t.strip()]
        if not parts:
            raise GptlabError(f"{f}: empty document (no text to write questions about)")
        for where, text in parts:
            pieces = chunks(text, chunk_chars)
            for i, piece in enumerate(pieces, 1):
                label = where if len(pieces) == 1 else f"{where} (part {i})"
                pages.append(Page(str(f), label, piece, language_of(piece) if language == "auto" else language))
    return pages
