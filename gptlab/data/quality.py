"""Pretraining data quality: exact and near-duplicate removal, and rule-based quality filters.

`gptlab prepare CORPUS --dedup exact|minhash --filter default` runs each document through `Cleaner` before
tokenizing it. Every document removed is written to DATA/removed.jsonl with its id, the reason, and for a
duplicate the id of the kept document it matched (and, for a near-duplicate, the estimated similarity).

- exact: the SHA-1 of the normalised text (NFKC, lower case, whitespace folded); 20 bytes per kept document.
- minhash: a MinHash signature of the document's word 2-gram shingles (CJK characters count as words), then
  LSH banding (b bands of r rows, chosen for the threshold as Leskovec et al., "Mining of Massive Datasets"
  ch. 3, weigh false positives and negatives), and each candidate checked by its estimated Jaccard
  similarity >= the threshold (default 0.7: a copy with 5% of its words edited keeps ~82% of its 2-grams,
  (1 - 2 x 0.05) / (1 + 2 x 0.05); two unrelated texts share a few percent). Vectorised with numpy: words hash once each (a per-corpus cache), shingles
  are polynomial hashes of their word hashes, the permutations multiply-shift hashes of 64-bit words.
  Memory grows with the kept documents (~1 KB each: the signature and its band keys), never with the text.
- filters: Gopher-style rules (Rae et al. 2021, appendix A), each with its default and switchable
  (`--filter default -digit_ratio min_words=20`); see RULES and docs/data.md.

The first of each duplicate group in corpus order is kept.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gptlab.data import pydocs
from gptlab.data.corpus import corpus_files
from gptlab.data.jsonl import read_jsonl
from gptlab.errors import GptlabError
from gptlab.limits import check

# CJK ideographs, kana and hangul: each character is a word (no spaces between words in those scripts)
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORD = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")
_CJK_CHAR = re.compile(f"[{_CJK}]")


def normalise(text: str) -> str:
    """NFKC, lower case, whitespace folded to single spaces (what exact duplicates are compared on)."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def split_words(normalised: str) -> list[str]:
    """Whitespace-separated words, each CJK character a word of its own."""
    return _WORD.findall(normalised)


def words(text: str) -> list[str]:
    return split_words(normalise(text))


def ngram_hashes(h: np.ndarray, n: int) -> np.ndarray:
    """(len - n + 1,) uint64 polynomial hashes (mod 2^64) of each run of n word hashes."""
    if len(h) < n:
        return np.empty(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        out = h[: len(h) - n + 1].copy()
        for j in range(1, n):
            out = out * np.uint64(0x100000001B3) + h[j: len(h) - n + 1 + j]
    return out


class WordHashes:
    """Words -> (n,) uint64 hashes (BLAKE2b, stable across runs); each distinct word hashed once (a bounded
    cache), as corpus words repeat."""

    def __init__(self, cache: int = 4_000_000) -> None:
        self._cache: dict[str, int] = {}
        self._limit = cache

    def _hash(self, w: str) -> int:
        h = int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little")
        if len(self._cache) < self._limit:
            self._cache[w] = h
        return h

    def __call__(self, ws: list[str]) -> np.ndarray:
        get = self._cache.get
        hashes = [get(w) for w in ws]  # most are one dict lookup
        if None in hashes:
            hashes = [x if x is not None else self._hash(w) for x, w in zip(hashes, ws)]
        return np.array(hashes, dtype=np.uint64)


# ---------------------------------------------------------------------------------------------------------
# documents


@dataclass
class Document:
    id: str  # the JSONL row's "id", else "FILE:ROW" (JSONL) / the file path / "python-docs:N"
    text: str


def read_documents(corpus: str | Path | Iterable[str | Path], text_field: str = "text") -> Iterator[Document]:
    """A corpus (as gptlab.data.corpus reads it) as whole documents: a JSONL row, a text file, or one of
    the embedded corpus's documents."""
    names = [corpus] if isinstance(corpus, (str, Path)) else list(corpus)
    for name in names:
        if str(name) == pydocs.NAME:
            for i, doc in enumerate(pydocs.documents()):
                yield Document(f"{pydocs.NAME}:{i}", doc)
            continue
        for path in corpus_files(name):
            if path.suffix.lower() == ".jsonl":
                for lineno, row in read_jsonl(path):
                    text = row.get(text_field)
                    if not isinstance(text, str):
                        raise GptlabError(f"{path}:{lineno}: field {text_field!r} is missing or not a string "
                                          f"(choose one with --text-field)")
                    if text.strip():
                        rid = row.get("id")
                        yield Document(str(rid) if rid is not None else f"{path}:{lineno}", text)
            else:
                try:
                    text = path.read_text(encoding="utf-8")
                except UnicodeDecodeError as e:
                    raise GptlabError(f"{path} is not UTF-8 text (invalid byte at offset {e.start})") from None
                if text.strip():
                    yield Document(str(path), text)


# ---------------------------------------------------------------------------------------------------------
# quality rules


@dataclass(frozen=True)
class Rule:
    name: str
    default: float
    what: str


RULES = {r.name: r for r in [
    Rule("min_words", 50, "at least this many words"),
    Rule("max_words", 100_000, "at most this many words"),
    Rule("min_mean_word_length", 3, "mean length of non-CJK words at least this (characters)"),
    Rule("max_mean_word_length", 10, "mean length of non-CJK words at most this"),
    Rule("max_symbol_ratio", 0.1, "'#' and '...' per word at most this"),
    Rule("max_digit_ratio", 0.3, "share of characters that are digits at most this"),
    Rule("max_bullet_lines", 0.9, "share of lines starting with a bullet at most this"),
    Rule("max_ellipsis_lines", 0.3, "share of lines ending with '...' or '…' at most this"),
    Rule("min_alpha_words", 0.8, "share of words with a letter at least this"),
    Rule("max_duplicate_lines", 0.3, "share of lines that repeat an earlier line at most this"),
    Rule("max_top_2gram", 0.2, "characters in the most common word 2-gram, as a share of all, at most this"),
    Rule("max_duplicate_5grams", 0.15, "characters in word 5-grams seen before in the document, as a share, at most this"),
]}


def parse_filters(specs: Iterable[str]) -> dict[str, float]:
    """--filter items -> {rule: threshold}: "default" (all rules at their defaults), "none", "NAME" (one rule
    at its default), "-NAME" (drop it), "NAME=VALUE" (set its threshold)."""
    active: dict[str, float] = {}
    for spec in specs:
        for item in (s.strip() for s in spec.split(",")):
            if not item:
                continue
            name, _, value = item.lstrip("-").partition("=")
            if item == "default":
                active.update({r.name: r.default for r in RULES.values()})
                continue
            if item == "none":
                active.clear()
                continue
            if name not in RULES:
                raise GptlabError(f"--filter: unknown rule {name!r}; rules: default, none, {', '.join(RULES)}")
            if item.startswith("-"):
                active.pop(name, None)
            elif value:
                try:
                    active[name] = float(value)
                except ValueError:
                    raise GptlabError(f"--filter {item}: the threshold must be a number") from None
                if not math.isfinite(active[name]) or active[name] < 0:
                    raise GptlabError(f"--filter {item}: the threshold must be a finite number >= 0")
            else:
                active[name] = RULES[name].default
    return active


def quality_failure(text: str, rules: dict[str, float]) -> str | None:
    """The first rule the document breaks, as "rule (value vs threshold)", or None."""
    ws = words(text)
    n = len(ws)

    def check(name: str, value: float, low: bool) -> str | None:
        if name in rules and (value < rules[name] if low else value > rules[name]):
            return f"{name} ({value:.3g} {'<' if low else '>'} {rules[name]:g})"
        return None

    latin = [w for w in ws if not _CJK_CHAR.fullmatch(w)]
    mean_len = sum(map(len, latin)) / len(latin) if len(latin) > n / 2 else None  # skipped for mostly-CJK text
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    checks = [
        lambda: check("min_words", n, True),
        lambda: check("max_words", n, False),
        lambda: check("min_mean_word_length", mean_len, True) if mean_len is not None else None,
        lambda: check("max_mean_word_length", mean_len, False) if mean_len is not None else None,
        lambda: check("max_symbol_ratio", (text.count("#") + text.count("...") + text.count("…")) / max(n, 1), False),
        lambda: check("max_digit_ratio", sum(c.isdigit() for c in text) / max(len(text), 1), False),
        lambda: check("max_bullet_lines", sum(ln[0] in "-*•‣◦" for ln in lines) / max(len(lines), 1), False),
        lambda: check("max_ellipsis_lines", sum(ln.endswith(("...", "…")) for ln in lines) / max(len(lines), 1), False),
        lambda: check("min_alpha_words", sum(any(c.isalpha() for c in w) for w in ws) / max(n, 1), True),
        lambda: check("max_duplicate_lines", (len(lines) - len(set(lines))) / max(len(lines), 1), False),
        lambda: check("max_top_2gram", _top_ngram_share(ws, 2), False),
        lambda: check("max_duplicate_5grams", _duplicate_ngram_share(ws, 5), False),
    ]
    for c in checks:
        failed = c()
        if failed:
            return failed
    return None


def _top_ngram_share(ws: list[str], k: int) -> float:
    if len(ws) < k:
        return 0.0
    counts = Counter(tuple(ws[i:i + k]) for i in range(len(ws) - k + 1))
    gram, c = counts.most_common(1)[0]
    return c * sum(map(len, gram)) / max(sum(map(len, ws)), 1)


def _duplicate_ngram_share(ws: list[str], k: int) -> float:
    """Characters covered by k-grams that occurred earlier in the document, as a share of all characters."""
    if len(ws) < k:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    covered = np.zeros(len(ws), dtype=bool)
    for i in range(len(ws) - k + 1):
        g = tuple(ws[i:i + k])
        if g in seen:
            covered[i:i + k] = True
        seen.add(g)
    lengths = np.fromiter(map(len, ws), dtype=np.int64, count=len(ws))
    return float(lengths[covered].sum() / max(lengths.sum(), 1))


# ---------------------------------------------------------------------------------------------------------
# MinHash + LSH

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 renamed it


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the area of false positives (similarity below
    the threshold yet a candidate) plus false negatives (above it yet not), equally weighted."""
    t = np.linspace(0.0, 1.0, 2001)
    best, choice = None, (1, num_perm)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1.0 - (1.0 - t ** r) ** b  # P(candidate | similarity t)
            err = _trapezoid(np.where(t < threshold, p, 1.0 - p), t)
            if best is None or err < best:
                best, choice = err, (b, r)
    return choice


class MinHasher:
    """MinHash signatures (num_perm uint32 values) of documents' word-shingle sets."""

    def __init__(self, num_perm: int = 128, shingle: int = 2, seed: int = 1) -> None:
        check("num_perm", num_perm)
        rng = np.random.default_rng(seed)
        self.num_perm, self.shingle = num_perm, shingle
        self.a = (rng.integers(1, 2**63, num_perm, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)  # odd
        self.b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
        self.hashes = WordHashes()

    def signature(self, ws: list[str]) -> np.ndarray:
        """(num_perm,) uint32: per permutation the minimum over the document's shingles (all 0xFFFFFFFF for a
        document without words)."""
        if not ws:
            return np.full(self.num_perm, 0xFFFFFFFF, dtype=np.uint32)
        h = self.hashes(ws)
        sh = np.unique(ngram_hashes(h, min(self.shingle, len(h))))
        with np.errstate(over="ignore"):
            # multiply-shift: (a x + b) mod 2^64, top 32 bits; one row per permutation
            out = np.full(self.num_perm, 0xFFFFFFFF, dtype=np.uint32)
            for start in range(0, len(sh), 4096):
                part = sh[start:start + 4096]
                v = (self.a[:, None] * part[None, :] + self.b[:, None]) >> np.uint64(32)
                out = np.minimum(out, v.min(axis=1).astype(np.uint32))
        return out


@dataclass
class Verdict:
    keep: bool
    reason: str | None = None
    match: str | None = None  # the kept document's id
    similarity: float | None = None


class Deduper:
    """Streaming duplicate removal: `check(doc)` answers keep or drop, remembering what it keeps."""

    def __init__(self, method: str = "minhash", threshold: float = 0.7, num_perm: int = 128,
                 shingle: int = 2) -> None:
        if method not in ("exact", "minhash"):
            raise GptlabError(f"--dedup must be exact or minhash, got {method!r}")
        check("dedup_threshold", threshold)
        self.method, self.threshold = method, threshold
        self._exact: dict[bytes, str] = {}  # digest -> id of the kept document
        if method == "minhash":
            self.hasher = MinHasher(num_perm, shingle)
            self.bands, self.rows = lsh_bands(threshold, num_perm)
            self._tables: list[dict[bytes, int]] = [{} for _ in range(self.bands)]
            self._sigs = np.empty((1024, num_perm), dtype=np.uint32)
            self._ids: list[str] = []

    def check(self, doc: Document) -> Verdict:
        norm = normalise(doc.text)
        digest = hashlib.sha1(norm.encode("utf-8")).digest()
        first = self._exact.get(digest)
        if first is not None:
            return Verdict(False, "exact_duplicate", first, 1.0)
        self._exact[digest] = doc.id
        if self.method == "exact":
            return Verdict(True)
        sig = self.hasher.signature(split_words(norm))
        keys = [sig[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]
        candidates = {self._tables[i][k] for i, k in enumerate(keys) if k in self._tables[i]}
        if candidates:
            idx = np.fromiter(candidates, dtype=np.int64, count=len(candidates))
            sims = (self._sigs[idx] == sig).mean(axis=1)
            best = int(sims.argmax())
            if sims[best] >= self.threshold:
                return Verdict(False, "near_duplicate", self._ids[idx[best]], round(float(sims[best]), 4))
        n = len(self._ids)
        if n == len(self._sigs):
            self._sigs = np.concatenate([self._sigs, np.empty_like(self._sigs)])
        self._sigs[n] = sig
        self._ids.append(doc.id)
        for i, k in enumerate(keys):
            self._tables[i].setdefault(k, n)
        return Verdict(True)


@dataclass
class Cleaner:
    """Dedup and quality rules over a document stream; counts what it removed, and why."""

    dedup: Deduper | None = None
    rules: dict[str, float] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)

    def check(self, doc: Document) -> dict[str, Any] | None:
        """None to keep the document, else its removed.jsonl row."""
        self.counts["documents"] += 1
        if self.rules:
            failed = quality_failure(doc.text, self.rules)
            if failed:
                rule = failed.split(" ")[0]
                self.counts[f"filter:{rule}"] += 1
                return {"id": doc.id, "reason": f"filter:{failed}"}
        if self.dedup is not None:
            v = self.dedup.check(doc)
            if not v.keep:
                self.counts[v.reason] += 1
                return {"id": doc.id, "reason": v.reason, "duplicate_of": v.match, "similarity": v.similarity}
        self.counts["kept"] += 1
        return None

    def summary(self) -> dict[str, Any]:
        """What the manifest records: the settings and the counts."""
        d = self.dedup
        return {"dedup": None if d is None else d.method,
                "dedup_threshold": None if d is None or d.method == "exact" else d.threshold,
                "num_perm": None if d is None or d.method == "exact" else d.hasher.num_perm,
                "filters": dict(self.rules), "counts": dict(self.counts)}
