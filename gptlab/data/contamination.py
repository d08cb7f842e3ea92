"""Train/test contamination: which eval examples share an n-gram with the training data (GPT-3's method,
Brown et al. 2020, appendix C), and the clean subset to evaluate on instead.

    gptlab contamination TRAIN EVAL... --ngram 13 --out DIR

Text is normalised as GPT-3 did: lower case, punctuation dropped, whitespace folded; words are what is left
between spaces, each CJK character a word of its own. An eval example is the words of all its string fields
(`id` left out). It is contaminated when one of its n-grams (all of it, when it is shorter than n but at
least MIN_WORDS words) occurs in a training document; n-grams found in more than `max_train_docs` training
documents are common phrases, not leaks, and are ignored. Examples shorter than MIN_WORDS cannot be judged
and count as clean (reported apart).

The eval side is held in memory (its n-grams as sorted 64-bit hashes); the training side streams, one
document at a time, so TRAIN may be far larger than memory: text files, folders, JSONL, the embedded corpus,
or a `gptlab prepare` data dir (its shards are decoded with its own tokenizer).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gptlab.data.jsonl import read_jsonl
from gptlab.data.quality import WordHashes, ngram_hashes, read_documents, split_words
from gptlab.errors import GptlabError
from gptlab.limits import check

MIN_WORDS = 8
EVAL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
TEXT_SUFFIXES = {".txt", ".text", ".md"}
_PUNCT = re.compile(r"[^\w\s]|_")


def contamination_words(text: str) -> list[str]:
    """GPT-3's normalisation: lower case, punctuation stripped, whitespace folded; CJK characters one word each."""
    text = unicodedata.normalize("NFKC", text).lower()
    return split_words(" ".join(_PUNCT.sub(" ", text).split()))


def read_eval(path: str | Path) -> list[dict[str, Any]]:
    """An eval file's examples as gptlab eval reads them: JSONL rows, or a text file's non-empty lines
    (as {"text": line})."""
    p = Path(path)
    if not p.is_file():
        raise GptlabError(f"eval file {path} does not exist")
    suffix = p.suffix.lower()
    if suffix in EVAL_SUFFIXES:
        rows = [row for _, row in read_jsonl(p)]
    elif suffix in TEXT_SUFFIXES:
        try:
            rows = [{"text": line} for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise GptlabError(f"{p} is not UTF-8 text (invalid byte at offset {e.start})") from None
    else:
        raise GptlabError(f"{p}: not an eval file gptlab reads (JSONL rows: .jsonl/.json/.ndjson, or a text "
                          f"file: .txt/.md, one example per line); got {suffix or 'no suffix'}")
    if not rows:
        raise GptlabError(f"{p} holds no examples")
    return rows


def example_text(row: dict[str, Any]) -> str:
    """All string values of a row (nested lists and objects too), `id` and `_line` left out."""
    out: list[str] = []

    def visit(v: Any) -> None:
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, list):
            for x in v:
                visit(x)
        elif isinstance(v, dict):
            for k, x in v.items():
                if k not in ("id", "_line"):
                    visit(x)

    visit(row)
    return "\n".join(out)


@dataclass
class _Example:
    file: int
    row: int
    words: list[str]
    length: int  # the n of its n-grams (0: too short to judge)
    grams: np.ndarray  # its n-gram hashes


@dataclass
class Report:
    ngram: int
    max_train_docs: int
    train_documents: int = 0
    train_words: int = 0
    files: list[dict[str, Any]] = field(default_factory=list)


def train_documents(train: str | Path | Iterable[str | Path], text_field: str = "text") -> Iterator[str]:
    """TRAIN's documents as text: a corpus (gptlab.data.quality.read_documents) or a prepared data dir."""
    names = [train] if isinstance(train, (str, Path)) else list(train)
    for name in names:
        p = Path(name)
        if p.is_dir() and (p / "manifest.json").is_file():
            yield from _prepared_documents(p)
        else:
            yield from (d.text for d in read_documents(name, text_field))


def _prepared_documents(data: Path) -> Iterator[str]:
    from gptlab.data.shards import read_manifest
    from gptlab.tokenizer import load_tokenizer

    manifest = read_manifest(data)
    tok = load_tokenizer(data / manifest.get("tokenizer", "tokenizer"))
    eos, dtype = manifest["eos_id"], np.dtype(manifest["dtype"])
    for split in ("train", "val"):
        rest = np.empty(0, dtype=dtype)
        for shard in manifest["splits"][split]["shards"]:
            ids = np.concatenate([rest, np.fromfile(data / shard["file"], dtype=dtype)])
            ends = np.flatnonzero(ids == eos)
            start = 0
            for e in ends:
                if e > start:
                    yield tok.decode(ids[start:e].tolist())
                start = e + 1
            rest = ids[start:]
        if len(rest):
            yield tok.decode(rest.tolist())


def find_contamination(train, evals: list[str | Path], out: str | Path, ngram: int = 13, max_train_docs: int = 10,
                       text_field: str = "text", show_progress: bool = True) -> Report:
    """Write OUT/<name>.contaminated.jsonl and OUT/<name>.clean.jsonl per eval file, and OUT/report.json and
    report.md; returns the report."""
    from tqdm.auto import tqdm

    check("ngram", ngram)  # at least MIN_WORDS
    check("max_train_docs", max_train_docs)
    hasher = WordHashes()
    files = [(Path(e), read_eval(e)) for e in evals]
    names = _names([p for p, _ in files])
    examples: list[_Example] = []
    for fi, (_, rows) in enumerate(files):
        for ri, row in enumerate(rows):
            ws = contamination_words(example_text(row))
            n = ngram if len(ws) >= ngram else (len(ws) if len(ws) >= MIN_WORDS else 0)
            grams = ngram_hashes(hasher(ws), n) if n else np.empty(0, dtype=np.uint64)
            examples.append(_Example(fi, ri, ws, n, grams))
    lengths = sorted({e.length for e in examples if e.length})
    index = {n: np.unique(np.concatenate([e.grams for e in examples if e.length == n] or
                                         [np.empty(0, dtype=np.uint64)])) for n in lengths}
    doc_counts = {n: np.zeros(len(index[n]), dtype=np.int64) for n in lengths}
    report = Report(ngram, max_train_docs)
    bar = tqdm(desc="contamination", unit=" docs", disable=not show_progress)
    for text in train_documents(train, text_field):
        ws = contamination_words(text)
        report.train_documents += 1
        report.train_words += len(ws)
        bar.update(1)
        if not ws:
            continue
        h = hasher(ws)
        for n in lengths:
            grams = ngram_hashes(h, n)
            if not len(grams) or not len(index[n]):
                continue
            at = np.searchsorted(index[n], grams)
            at = np.minimum(at, len(index[n]) - 1)
            hit = np.unique(at[index[n][at] == grams])
            doc_counts[n][hit] += 1  # once per document
    bar.close()
    if report.train_documents == 0:
        raise GptlabError("the training corpus holds no documents")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for fi, (path, rows) in enumerate(files):
        mine = [e for e in examples if e.file == fi]
        contaminated, clean = [], []
        too_short = 0
        for e in mine:
            match = _match(e, index, doc_counts, max_train_docs)
            if e.length == 0:
                too_short += 1
            row = {k: v for k, v in rows[e.row].items()}
            if match is None:
                clean.append(row)
            else:
                contaminated.append({**row, "contamination": {"ngram": match[0], "train_documents": match[1]}})
        _write_jsonl(out / f"{names[fi]}.contaminated.jsonl", contaminated)
        _write_jsonl(out / f"{names[fi]}.clean.jsonl", clean)
        report.files.append({"file": str(path), "name": names[fi], "examples": len(mine),
                             "contaminated": len(contaminated), "clean": len(clean), "too_short": too_short,
                             "contaminated_fraction": len(contaminated) / len(mine)})
    (out / "report.json").write_text(json.dumps(report.__dict__, indent=2, ensure_ascii=False) + "\n",
                                     encoding="utf-8")
    (out / "report.md").write_text(_markdown(report), encoding="utf-8")
    return report


def _match(e: _Example, index, doc_counts, max_train_docs: int) -> tuple[str, int] | None:
    """The example's first n-gram found in 1..max_train_docs training documents, as text, and that count."""
    if not e.length:
        return None
    idx, counts = index[e.length], doc_counts[e.length]
    pos = np.searchsorted(idx, e.grams)
    c = counts[pos]
    ok = np.flatnonzero((c >= 1) & (c <= max_train_docs))
    if not len(ok):
        return None
    i = int(ok[0])
    return " ".join(e.words[i:i + e.length]), int(c[i])


def _names(paths: list[Path]) -> list[str]:
    names, seen = [], {}
    for p in paths:
        base = p.stem
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _markdown(r: Report) -> str:
    lines = [f"# Contamination report ({r.ngram}-grams)", "",
             f"Training data: {r.train_documents:,} documents, {r.train_words:,} words. An example is contaminated "
             f"when one of its {r.ngram}-grams occurs in 1 to {r.max_train_docs} training documents.", "",
             "| eval file | examples | contaminated | clean | too short to judge |", "|---|---|---|---|---|"]
    for f in r.files:
        lines.append(f"| {f['file']} | {f['examples']} | {f['contaminated']} ({100 * f['contaminated_fraction']:.1f}%) "
                     f"| {f['clean']} | {f['too_short']} |")
    lines += ["", "Evaluate on the clean subsets: `gptlab eval MODEL --task ... --data OUT/<name>.clean.jsonl`.", ""]
    return "\n".join(lines)
