"""Evaluation data: local JSONL or text files, or a standard benchmark fetched by name with `datasets`.

Local files are the normal case and need no network. Each task states the fields it reads (see
docs/eval.md); a malformed row is an error that names the file and line. Standard names are converted to
the same fields with the prompts the harness's task YAMLs use, so numbers are comparable.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptlab.data import jsonl
from gptlab.errors import GptlabError, reason

Doc = dict[str, Any]


def read_jsonl(path: str | Path, limit: int | None = None) -> list[Doc]:
    """Objects of a JSONL file (gptlab.data.jsonl), each with its line number as `_line`, the first `limit`."""
    docs: list[Doc] = []
    if limit is not None and limit < 1:
        return docs
    for lineno, doc in jsonl.read_jsonl(path):
        docs.append({**doc, "_line": lineno})
        if len(docs) == limit:
            break  # what lies beyond the limit is not read
    return docs


def require(doc: Doc, field: str, kind: type | tuple[type, ...], where: str) -> Any:
    """doc[field], checked to be of `kind`; the error names the row (`where`, e.g. "data.jsonl:12")."""
    if field not in doc:
        present = ", ".join(k for k in doc if k != "_line") or "none"
        raise GptlabError(f"{where}: missing field {field!r} (has {present})")
    value = doc[field]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise GptlabError(f"{where}: field {field!r} must be {names}, got {type(value).__name__}")
    return value


def where(source: str, doc: Doc, index: int) -> str:
    """"file:line" for a row read from JSONL, else "source[index]"."""
    return f"{source}:{doc['_line']}" if "_line" in doc else f"{source}[{index}]"


def parse_rows(docs: Sequence[Doc], source: str, parse: Callable[[Doc, str], Any]) -> list[Any]:
    """`parse(doc, at)` for each row, `at` naming the row for errors ("file:line", else "source[i]")."""
    return [parse(d, where(source, d, i)) for i, d in enumerate(docs)]


def render(template: str, doc: Doc, at: str) -> str:
    """`template.format(**doc)`; a field the row lacks is an error naming the row (`at`)."""
    try:
        return template.format(**doc)
    except KeyError as e:
        raise GptlabError(f"{at}: the template uses field {e.args[0]!r}, which this row lacks") from None
    except (IndexError, ValueError) as e:
        raise GptlabError(f"template {template!r} is not a valid format string: {e}") from None


# ---------------------------------------------------------------------------------------------------------
# standard benchmarks, converted as the harness's task YAMLs do (lm_eval/tasks/<name>/)


@dataclass(frozen=True)
class Benchmark:
    task: str  # the gptlab task that evaluates it
    path: str  # Hugging Face dataset id
    name: str | None  # dataset config
    split: str
    convert: Callable[[Doc], Doc]


def _hellaswag(d: Doc) -> Doc:
    # lm_eval/tasks/hellaswag/utils.py
    def pre(text: str) -> str:
        text = text.strip().replace(" [title]", ". ")
        return re.sub("\\[.*?\\]", "", text).replace("  ", " ")

    ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
    return {"context": pre(d["activity_label"] + ": " + ctx), "choices": [pre(e) for e in d["endings"]],
            "label": int(d["label"])}


def _arc(d: Doc) -> Doc:
    return {"context": f"Question: {d['question']}\nAnswer:", "choices": list(d["choices"]["text"]),
            "label": list(d["choices"]["label"]).index(d["answerKey"])}


def _piqa(d: Doc) -> Doc:
    return {"context": f"Question: {d['goal']}\nAnswer:", "choices": [d["sol1"], d["sol2"]], "label": int(d["label"])}


def _mmlu(d: Doc) -> Doc:
    c = d["choices"]
    prompt = f"{d['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"
    return {"context": prompt, "choices": ["A", "B", "C", "D"], "label": int(d["answer"])}


BENCHMARKS: dict[str, Benchmark] = {
    "wikitext-2": Benchmark("perplexity", "EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test",
                           lambda d: {"text": d["page"]}),
    "lambada": Benchmark("lambada", "EleutherAI/lambada_openai", "default", "test", lambda d: {"text": d["text"]}),
    "hellaswag": Benchmark("multiple_choice", "Rowan/hellaswag", None, "validation", _hellaswag),
    "arc_easy": Benchmark("multiple_choice", "allenai/ai2_arc", "ARC-Easy", "test", _arc),
    "arc_challenge": Benchmark("multiple_choice", "allenai/ai2_arc", "ARC-Challenge", "test", _arc),
    "piqa": Benchmark("multiple_choice", "baber/piqa", None, "validation", _piqa),
    "mmlu": Benchmark("multiple_choice", "cais/mmlu", "all", "test", _mmlu),
}


def fetch_standard(name: str, limit: int | None = None) -> list[Doc]:
    """Download a standard benchmark with `datasets` (imported only here) and convert its rows."""
    spec = BENCHMARKS[name]
    try:
        import datasets
    except ImportError:
        raise GptlabError(f"fetching {name!r} needs the `datasets` package (pip install datasets), "
                          f"or pass a local JSONL file with --data") from None
    split = spec.split if limit is None else f"{spec.split}[:{limit}]"
    try:
        rows = datasets.load_dataset(spec.path, spec.name, split=split)
    except Exception as e:  # offline, renamed or gated: all end the same way for the user
        raise GptlabError(f"could not fetch {name!r} ({spec.path}) with `datasets`: {reason(e)}; "
                          f"download it where you have network access, or pass a local file with --data") from None
    return [spec.convert(dict(r)) for r in rows]


def load_docs(data: str | Path, limit: int | None = None, text_ok: bool = False) -> list[Doc]:
    """Rows of a local JSONL file, a text file as one document {"text": ...} (when `text_ok`), or a
    standard benchmark by name (`BENCHMARKS`)."""
    path = Path(data)
    if path.is_file():
        if path.suffix in (".jsonl", ".json", ".ndjson"):
            return read_jsonl(path, limit)
        if not text_ok:
            raise GptlabError(f"{path}: this task reads JSONL (one JSON object per line, a .jsonl file); "
                              f"got a {path.suffix or 'plain'} file")
        try:
            return [{"text": path.read_text(encoding="utf-8")}]
        except UnicodeDecodeError as e:
            raise GptlabError(f"{path} is not UTF-8 text: {e}") from None
    if str(data) in BENCHMARKS:
        return fetch_standard(str(data), limit)
    raise GptlabError(f"data {str(data)!r} is neither a file nor a standard benchmark name "
                      f"({', '.join(BENCHMARKS)})")


def fewshot_examples(docs: Sequence[Any], shots: Sequence[Any] | None, k: int, seed: int) -> list[list[Any]]:
    """k examples per doc, drawn as the harness's ContextSampler draws them (lm_eval/api/samplers.py):
    one random.Random(seed) for the whole run, docs in order; from `shots` if given, else from `docs` with
    the doc itself removed (k + 1 drawn, the doc dropped, the first k kept)."""
    import random

    if k <= 0:
        return [[] for _ in docs]
    pool = list(shots) if shots is not None else list(docs)
    need = k if shots is not None else k + 1
    if len(pool) < need:
        raise GptlabError(f"{k}-shot needs at least {need} examples to draw from, got {len(pool)}")
    rnd = random.Random(seed)
    if shots is not None:
        return [rnd.sample(pool, k) for _ in docs]
    return [[d for d in rnd.sample(pool, k + 1) if d is not doc][:k] for doc in docs]


def fewshot_contexts(docs: Sequence[Any], shots: Sequence[Any] | None, k: int, seed: int,
                     render: Callable[[Any], tuple[str, str]]) -> list[str]:
    """A k-shot prefix per doc: "q_1 a_1\\n\\nq_2 a_2\\n\\n" (the harness's target and fewshot delimiters)."""
    return ["".join(f"{q} {a}\n\n" for q, a in map(render, picked)) for picked in fewshot_examples(docs, shots, k, seed)]
