"""`gptlab synth qa`: documents -> teacher -> filtered question-answer pairs -> train / test files + a report.

Filters, each drop counted by reason in the report:

    empty_question, empty_answer   nothing to learn from
    long_answer                    an answer over `max_answer_chars` (teachers that paste the page)
    number_not_in_page             an answer holding a number its page does not state, compared by value as the
                                   strict scorer compares them (eval/numbers.py: 50,000 = 50000, 0.5% = 0.005)
    duplicate_question             the same question after the QA scorer's normalisation (case, width,
                                   punctuation, articles: eval/qa.py)
    near_duplicate_question        MinHash over pairs of those words (data/quality.py) at `dedup_threshold`
                                   similarity (0.8: one word added to a ten-word question; a word swapped,
                                   "personal" for "business", is a new question)

Output rows {"question", "answer", "source", "where", "language"} are read unchanged by
`gptlab finetune --task sft` and `gptlab eval --task qa`. The split is by pair (seeded) or by page.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

from gptlab.data.quality import Deduper, Document
from gptlab.errors import GptlabError
from gptlab.eval.numbers import extract_numbers
from gptlab.eval.qa import tokens
from gptlab.formats.files import check_destination
from gptlab.limits import check
from gptlab.synth.documents import Page, read_documents
from gptlab.synth.prompt import numeric_count

CACHE = "cache/teacher.jsonl"
REASONS = ("empty_question", "empty_answer", "long_answer", "number_not_in_page", "duplicate_question",
           "near_duplicate_question")


def _numbers_in_page(answer: str, page_numbers: list) -> bool:
    return all(any(a.equals(p) for p in page_numbers) for a in extract_numbers(answer))


def filter_pairs(pages: list[Page], replies: list[list[tuple[str, str]]], max_answer_chars: int = 300,
                 dedup_threshold: float = 0.8) -> tuple[list[dict[str, Any]], Counter]:
    """The pairs that pass every filter (in page order), and the drops by reason."""
    drops: Counter = Counter()
    dedup = Deduper("minhash", threshold=dedup_threshold)
    kept = []
    for i, (page, pairs) in enumerate(zip(pages, replies)):
        page_numbers = extract_numbers(page.text)
        for j, (q, a) in enumerate(pairs):
            reason = None
            if not q.strip():
                reason = "empty_question"
            elif not a.strip():
                reason = "empty_answer"
            elif len(a) > max_answer_chars:
                reason = "long_answer"
            elif not _numbers_in_page(a, page_numbers):
                reason = "number_not_in_page"
            else:
                verdict = dedup.check(Document(f"{i}:{j}", " ".join(tokens(q))))
                if not verdict.keep:
                    reason = "duplicate_question" if verdict.reason == "exact_duplicate" else "near_duplicate_question"
            if reason:
                drops[reason] += 1
                continue
            kept.append({"question": q.strip(), "answer": a.strip(), "source": page.source, "where": page.where,
                         "language": page.language, "page": i, "numeric": bool(extract_numbers(a))})
    return kept, drops


def split(pairs: list[dict[str, Any]], test_fraction: float, by: str, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test): a seeded share of the pairs, or of the pages, held out."""
    if by not in ("pair", "page"):
        raise GptlabError(f"--split-by must be pair or page, got {by!r}")
    rnd = random.Random(seed)
    units = sorted({p["page"] for p in pairs}) if by == "page" else list(range(len(pairs)))
    rnd.shuffle(units)
    n_test = round(len(units) * test_fraction)
    if test_fraction > 0 and len(units) > 1:
        n_test = min(max(n_test, 1), len(units) - 1)  # at least one on each side
    held = set(units[:n_test])
    test = [p for i, p in enumerate(pairs) if (p["page"] if by == "page" else i) in held]
    train = [p for i, p in enumerate(pairs) if (p["page"] if by == "page" else i) not in held]
    return train, test


def _teacher(teacher: str, teacher_model: str | None, api_key: str | None, concurrency: int, max_retries: int,
             response_format: str, max_answer_chars: int, temperature: float, out: Path):
    if teacher == "extractive":
        from gptlab.synth.extractive import ExtractiveTeacher

        return ExtractiveTeacher()
    from gptlab.synth.teacher import ChatTeacher

    if not teacher_model:
        raise GptlabError("--teacher-model is required with a teacher URL (the model name the endpoint serves)")
    return ChatTeacher(teacher, teacher_model, api_key=api_key, concurrency=concurrency, max_retries=max_retries,
                       temperature=temperature,
                       response_format=response_format, max_answer_chars=max_answer_chars, cache_path=out / CACHE)


def synth_qa(docs: list[str], out: str | Path, teacher: str = "extractive", teacher_model: str | None = None,
             api_key: str | None = None, pairs_per_page: int = 15, numeric_share: float = 0.3, language: str = "auto",
             chunk_chars: int = 3000, concurrency: int = 4, max_retries: int = 5, response_format: str = "auto",
             temperature: float = 0.3,
             max_answer_chars: int = 300, dedup_threshold: float = 0.8, test_fraction: float = 0.2,
             split_by: str = "pair", seed: int = 0, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Synthesise, filter and split; writes OUT/train.jsonl, test.jsonl, report.json, report.md. The report."""
    for name, value in (("pairs_per_page", pairs_per_page), ("numeric_share", numeric_share),
                        ("chunk_chars", chunk_chars), ("concurrency", concurrency), ("max_retries", max_retries),
                        ("max_answer_chars", max_answer_chars), ("dedup_threshold", dedup_threshold),
                        ("test_fraction", test_fraction), ("temperature", temperature)):
        check(name, value)
    if split_by not in ("pair", "page"):
        raise GptlabError(f"--split-by must be pair or page, got {split_by!r}")
    out = check_destination(out, ("report.json", CACHE), "the QA dir", overwrite)
    start = time.perf_counter()
    pages = read_documents(docs, chunk_chars, language)  # every document read before any teacher call
    t = _teacher(teacher, teacher_model, api_key, concurrency, max_retries, response_format, max_answer_chars,
                 temperature, out)
    replies = t.ask(pages, pairs_per_page, numeric_share, progress)
    kept, drops = filter_pairs(pages, replies, max_answer_chars, dedup_threshold)
    if not kept:
        hint = ("the extractive teacher found no sentence with a number written in digits" if teacher == "extractive"
                else f"the teacher's replies are in {out / CACHE}")
        raise GptlabError(f"no pairs survived the filters (dropped: {dict(drops) or 'none received'}); {hint}")
    train, test = split(kept, test_fraction, split_by, seed)
    report = _report(pages, replies, kept, drops, train, test, t.stats.as_dict(), pairs_per_page, numeric_share,
                     {"teacher": teacher, "teacher_model": teacher_model, "split_by": split_by, "seed": seed,
                      "test_fraction": test_fraction, "dedup_threshold": dedup_threshold,
                      "max_answer_chars": max_answer_chars, "chunk_chars": chunk_chars, "language": language})
    report["seconds"] = round(time.perf_counter() - start, 3)
    _write(out, train, test, report)
    return report


def _report(pages, replies, kept, drops, train, test, teacher_stats, pairs_per_page, numeric_share, settings):
    per_page = Counter(p["page"] for p in kept)
    counts = [per_page.get(i, 0) for i in range(len(pages))]
    numeric = sum(p["numeric"] for p in kept)
    return {
        "documents": len({p.source for p in pages}), "pages": len(pages),
        "languages": dict(Counter(p.language for p in pages)),
        "pairs_asked": pairs_per_page * len(pages), "pairs_received": sum(map(len, replies)), "pairs_kept": len(kept),
        "dropped": {r: drops.get(r, 0) for r in REASONS},
        "pairs_per_page": {"mean": round(len(kept) / len(pages), 3), "min": min(counts), "max": max(counts)},
        "numeric_share": {"asked": numeric_count(pairs_per_page, numeric_share) / pairs_per_page,
                          "achieved": round(numeric / len(kept), 4)},
        "train": len(train), "test": len(test), "test_numeric": sum(p["numeric"] for p in test),
        "teacher_stats": teacher_stats, "settings": settings,
    }


def _rows(pairs: list[dict]) -> str:
    keep = ("question", "answer", "source", "where", "language")
    return "".join(json.dumps({k: p[k] for k in keep}, ensure_ascii=False) + "\n" for p in pairs)


def _write(out: Path, train: list[dict], test: list[dict], report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("train.jsonl", _rows(train)), ("test.jsonl", _rows(test)),
                       ("report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n"),
                       ("report.md", markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)


def markdown(r: dict) -> str:
    s = r["teacher_stats"]
    lines = [
        "# QA synthesis report", "",
        f"- documents: {r['documents']}, pages: {r['pages']} ({', '.join(f'{k}: {v}' for k, v in r['languages'].items())})",
        f"- teacher: {r['settings']['teacher']}" + (f" ({r['settings']['teacher_model']})" if r['settings']['teacher_model'] else ""),
        f"- pairs asked {r['pairs_asked']}, received {r['pairs_received']}, kept {r['pairs_kept']}",
        f"- pairs per page kept: mean {r['pairs_per_page']['mean']}, min {r['pairs_per_page']['min']}, "
        f"max {r['pairs_per_page']['max']}",
        f"- numeric share: asked {r['numeric_share']['asked']:.0%}, achieved {r['numeric_share']['achieved']:.0%}",
        f"- split by {r['settings']['split_by']}: train {r['train']}, test {r['test']} ({r['test_numeric']} numeric)",
        f"- teacher calls {s['calls']} (cached {s['cached']}, retries {s['retries']}, unreadable replies "
        f"{s['unreadable']}), tokens in {s['prompt_tokens']} / out {s['completion_tokens']}"
        + (", JSON schema enforced" if s["schema"] else ""),
        f"- wall time: {r['seconds']:.1f} s", "", "| dropped because | pairs |", "|---|---:|",
        *[f"| {k} | {v} |" for k, v in r["dropped"].items()], "",
    ]
    return "\n".join(lines)
