"""Text classification by label scoring: each label's log-likelihood as the continuation of a prompt.

Each JSONL row holds `text` and `label` (a string; other fields may be used by the template). The prompt is
`template.format(**row)` (default "{text}\\nLabel:"), each label is scored as " " + label, and the
prediction is the likeliest label (the same requests as a multiple-choice question whose choices are the
labels, so they share one prefill). Reported:

    acc                                   mean of [pred == label], with its sample standard error
    macro_f1                              unweighted mean of the per-class F1
    per class: precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2PR / (P + R) (0 when undefined)
    confusion[i][j]                       rows with true label i predicted as j
"""

from __future__ import annotations

from gptlab.eval.data import Doc, fewshot_contexts, parse_rows, render, require
from gptlab.eval.metrics import classification_report, confusion_matrix
from gptlab.eval.results import EvalResult, mean_stderr
from gptlab.eval.scorer import Scorer
from gptlab.errors import GptlabError

DEFAULT_TEMPLATE = "{text}\nLabel:"


def evaluate_classification(scorer: Scorer, docs: list[Doc], labels: list[str] | None = None,
                            template: str | None = None, num_fewshot: int = 0,
                            fewshot_docs: list[Doc] | None = None, seed: int = 1234,
                            source: str = "data") -> EvalResult:
    template = template or DEFAULT_TEMPLATE
    def parse(d: Doc, at: str) -> tuple[str, str, str]:
        return render(template, d, at), require(d, "label", str, at), at

    rows = parse_rows(docs, source, parse)
    if not rows:
        raise GptlabError(f"{source}: no rows to classify")
    labels = list(labels) if labels else sorted({label for _, label, _ in rows})
    if len(labels) < 2:
        raise GptlabError(f"classification needs at least two labels, got {labels}")
    for _, label, at in rows:
        if label not in labels:
            raise GptlabError(f"{at}: label {label!r} is not one of {labels}")
    shots = None if fewshot_docs is None else parse_rows(fewshot_docs, "fewshot data", parse)
    prefixes = fewshot_contexts(rows, shots, num_fewshot, seed, lambda r: r[:2])
    pairs = [(prefix + prompt, " " + label) for prefix, (prompt, _, _) in zip(prefixes, rows) for label in labels]
    seconds, tokens = scorer.seconds, scorer.tokens
    scores = iter(scorer.loglikelihood(pairs, desc="classification"))
    gold, pred, samples = [], [], []
    for _, label, _ in rows:
        lls = [next(scores)[0] for _ in labels]
        p = max(range(len(labels)), key=lambda j: (lls[j], -j))
        gold.append(labels.index(label))
        pred.append(p)
        samples.append({"label": label, "pred": labels[p], "loglikelihoods": dict(zip(labels, lls))})
    hits = [float(g == p) for g, p in zip(gold, pred)]
    details = classification_report(confusion_matrix(gold, pred, len(labels)), labels)
    details.pop("accuracy")  # reported as acc, with its standard error
    metrics = {"acc": sum(hits) / len(hits), "macro_f1": details.pop("macro_f1")}
    return EvalResult(task="classification", metrics=metrics, stderr={"acc": mean_stderr(hits), "macro_f1": None},
                      n=len(rows), seconds=scorer.seconds - seconds, tokens=scorer.tokens - tokens,
                      config={"template": template, "num_fewshot": num_fewshot, "seed": seed},
                      details=details, samples=samples)
