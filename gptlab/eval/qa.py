"""Open-ended question answering: generate an answer per question, score it leniently and strictly.

Each JSONL row holds `question` and `answer` (a string, or a list of acceptable strings; `answers` works
too). The prompt is `template.format(**row)` (default "Question: {question}\\nAnswer:"), or with `chat`
the tokenizer's chat template around the question (a tokenizer without one gets the instruction template
SFT trains with, data/examples.py, so a base model and its fine-tune are asked the same way). Decoding is
greedy and stops at `stop` strings.

Lenient scores (SQuAD v1.1's evaluate script, Rajpurkar et al. 2016, with CJK characters as tokens as in
the CMRC / MLQA scripts): text is NFKC-normalised, lower-cased, stripped of punctuation and of the
articles a / an / the, and split into words, each CJK character a word of its own.

    exact     normalised answer == normalised reference
    f1        token-overlap F1 between them
    contains  the reference's tokens appear contiguously in the answer's

Strict (`numbers.py`): when the reference holds numbers, every one must appear in the answer with the same
value (extra numbers allowed); when it holds none, strict = contains. `numeric_acc` is strict accuracy
over the questions whose reference holds a number, reported with their count. With several references
each score is the best over them. `strip_think` drops <think>...</think> reasoning before scoring.
"""

from __future__ import annotations

import re
import string
import time
import unicodedata
from collections import Counter

from gptlab.eval.data import Doc, parse_rows, require
from gptlab.eval.numbers import extract_numbers, numbers_match
from gptlab.eval.results import EvalResult, mean_stderr
from gptlab.errors import GptlabError

DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af])")


def strip_think(text: str) -> str:
    """The answer without reasoning: <think>...</think> blocks removed (Qwen3, DeepSeek-R1 style).

    If only "</think>" appears (the prompt opened the block), the answer is what follows it; an unclosed
    "<think>" means the answer never came, and everything from it on is dropped.
    """
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.S)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    return text.split("<think>", 1)[0].strip()


def tokens(text: str) -> list[str]:
    """SQuAD normalisation (lower, no punctuation, no articles), then words; each CJK character a word."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(c).startswith("P") or c in string.punctuation else c for c in text)
    text = _ARTICLES.sub(" ", text)
    return _CJK.sub(r" \1 ", text).split()


def f1(answer: list[str], reference: list[str]) -> float:
    common = Counter(answer) & Counter(reference)
    same = sum(common.values())
    if not answer or not reference:
        return float(answer == reference)
    if same == 0:
        return 0.0
    precision, recall = same / len(answer), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def _contains(answer: list[str], reference: list[str]) -> bool:
    n = len(reference)
    return n > 0 and any(answer[i: i + n] == reference for i in range(len(answer) - n + 1))


def score_answer(answer: str, references: list[str], rel_tol: float = 0.0) -> dict[str, float | bool]:
    """exact / f1 / contains / strict of one answer (best over references), and whether numbers were asked."""
    ans = tokens(answer)
    best = {"exact": 0.0, "f1": 0.0, "contains": 0.0, "strict": 0.0}
    has_number = False
    for ref in references:
        ref_toks = tokens(ref)
        contains = _contains(ans, ref_toks)
        ref_has_number = bool(extract_numbers(ref))
        has_number |= ref_has_number
        strict = numbers_match(ref, answer, rel_tol) if ref_has_number else contains
        for k, v in (("exact", ans == ref_toks), ("f1", f1(ans, ref_toks)), ("contains", contains), ("strict", strict)):
            best[k] = max(best[k], float(v))
    return {**best, "has_number": has_number}


def _references(doc: Doc, at: str) -> list[str]:
    field = "answer" if "answer" in doc else "answers"
    refs = require(doc, field, (str, list), at)
    refs = [refs] if isinstance(refs, str) else refs
    if not refs or not all(isinstance(r, str) for r in refs):
        raise GptlabError(f"{at}: {field!r} must be a string or a non-empty list of strings")
    return refs


def evaluate_qa(model, tokenizer, docs: list[Doc], batch_size: int = 16, template: str | None = None,
                max_new_tokens: int = 64, stop: list[str] | None = None, strip_thinking: bool = False,
                chat: bool = False, num_fewshot: int = 0, fewshot_docs: list[Doc] | None = None,
                seed: int = 1234, rel_tol: float = 0.0, progress: bool = True, source: str = "data") -> EvalResult:
    from tqdm.auto import tqdm

    from gptlab.eval.data import fewshot_contexts, render
    from gptlab.infer.generate import generate

    template = template or DEFAULT_TEMPLATE
    def parse(d: Doc, at: str) -> tuple[Doc, str, list[str], str]:
        return d, require(d, "question", str, at), _references(d, at), at

    rows = parse_rows(docs, source, parse)
    if not rows:
        raise GptlabError(f"{source}: no questions to evaluate")
    pool = None if fewshot_docs is None else parse_rows(fewshot_docs, "fewshot data", parse)
    if chat:
        from gptlab.data.examples import ensure_chat_template

        ensure_chat_template(tokenizer)  # a base model: the instruction template SFT would train it with
        shots = _chat_shots(rows, pool, num_fewshot, seed)
        prompts = [tokenizer.apply_chat_template(turns + [{"role": "user", "content": q}])
                   for turns, (_, q, _, _) in zip(shots, rows)]
        stop = [] if stop is None else stop
    else:
        prefixes = fewshot_contexts(rows, pool, num_fewshot, seed, lambda r: (render(template, r[0], r[3]), r[2][0]))
        prompts = [p + render(template, d, at) for p, (d, _, _, at) in zip(prefixes, rows)]
        stop = ["\n"] if stop is None else stop

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    outputs: list[str] = [""] * len(prompts)
    start, generated = time.perf_counter(), 0
    with tqdm(total=len(prompts), desc="qa generation", disable=not progress, leave=False) as bar:
        for b in range(0, len(order), batch_size):
            idx = order[b: b + batch_size]
            texts = generate(model, tokenizer, [prompts[i] for i in idx], max_new_tokens=max_new_tokens,
                             temperature=0.0, stop=stop, truncate=True)
            for i, t in zip(idx, texts):
                outputs[i] = t
                generated += len(tokenizer.encode(t))
            bar.update(len(idx))
    seconds = time.perf_counter() - start

    per_metric: dict[str, list[float]] = {k: [] for k in ("exact", "f1", "contains", "strict")}
    numeric, samples = [], []
    for (d, q, refs, _), out in zip(rows, outputs):
        answer = strip_think(out) if strip_thinking else out.strip()
        s = score_answer(answer, refs, rel_tol)
        for k in per_metric:
            per_metric[k].append(float(s[k]))
        if s["has_number"]:
            numeric.append(float(s["strict"]))
        samples.append({"question": q, "references": refs, "output": out, "answer": answer, **s})
    metrics = {k: sum(v) / len(v) for k, v in per_metric.items()}
    stderr = {k: mean_stderr(v) for k, v in per_metric.items()}
    metrics["numeric_acc"] = sum(numeric) / len(numeric) if numeric else None  # no reference holds a number
    stderr["numeric_acc"] = mean_stderr(numeric)
    return EvalResult(task="qa", metrics=metrics, stderr=stderr, n=len(rows), seconds=seconds, tokens=generated,
                      config={"template": None if chat else template, "chat": chat, "stop": stop,
                              "max_new_tokens": max_new_tokens, "strip_think": strip_thinking,
                              "num_fewshot": num_fewshot, "seed": seed},
                      details={"numeric_questions": len(numeric)}, samples=samples)


def _chat_shots(rows, pool, k: int, seed: int) -> list[list[dict[str, str]]]:
    """k-shot examples as earlier user / assistant turns."""
    from gptlab.eval.data import fewshot_examples

    return [[turn for _, q, refs, _ in picked for turn in ({"role": "user", "content": q},
                                                         {"role": "assistant", "content": refs[0]})]
            for picked in fewshot_examples(rows, pool, k, seed)]
