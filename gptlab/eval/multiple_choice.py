"""Multiple choice (HellaSwag, ARC, PIQA, MMLU, ... in one shape): pick the choice the model finds likeliest.

Each JSONL row holds `context` (str), `choices` (list of str) and `label` (the right choice's index, or its
text). As in the harness's `multiple_choice` output type (lm_eval/api/task.py ConfigurableTask):

    request_j = (fewshot prefix + context, " " + choices[j])      log-likelihood ll_j
    acc      = [argmax_j ll_j == label]
    acc_norm = [argmax_j ll_j / len(choices[j]) == label]          length in characters, as the harness
    acc_bytes = [argmax_j ll_j / len(choices[j].encode()) == label]  reported when a choice is non-ASCII

Ties go to the lowest index (numpy argmax). k-shot prefixes are "context answer\\n\\n" per example, drawn
with a fixed seed (data.fewshot_contexts). The choices of a question share one prefill of its context.
"""

from __future__ import annotations

from gptlab.eval.data import Doc, fewshot_contexts, require, where
from gptlab.eval.results import EvalResult, mean_stderr
from gptlab.eval.scorer import Scorer
from gptlab.errors import GptlabError


def parse_mc(doc: Doc, at: str) -> tuple[str, list[str], int]:
    context = require(doc, "context", str, at)
    choices = require(doc, "choices", list, at)
    if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise GptlabError(f"{at}: 'choices' must be a list of at least two strings")
    label = require(doc, "label", (int, str), at)
    if isinstance(label, str):
        if label not in choices:
            raise GptlabError(f"{at}: label {label!r} is not one of the choices")
        label = choices.index(label)
    if not 0 <= label < len(choices):
        raise GptlabError(f"{at}: label {label} is out of range for {len(choices)} choices")
    return context, choices, label


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda j: (values[j], -j))  # first index on ties, as np.argmax


def evaluate_multiple_choice(scorer: Scorer, docs: list[Doc], num_fewshot: int = 0,
                             fewshot_docs: list[Doc] | None = None, seed: int = 1234,
                             source: str = "data") -> EvalResult:
    parsed = [parse_mc(d, where(source, d, i)) for i, d in enumerate(docs)]
    if not parsed:
        raise GptlabError(f"{source}: no questions to evaluate")
    shots = None
    if fewshot_docs is not None:
        shots = [parse_mc(d, where("fewshot data", d, i)) for i, d in enumerate(fewshot_docs)]
    prefixes = fewshot_contexts(parsed, shots, num_fewshot, seed, lambda p: (p[0], p[1][p[2]]))
    pairs = [(prefix + ctx, " " + c) for prefix, (ctx, choices, _) in zip(prefixes, parsed) for c in choices]
    seconds, tokens = scorer.seconds, scorer.tokens
    scores = iter(scorer.loglikelihood(pairs, desc="multiple choice"))
    acc, acc_norm, acc_bytes, samples = [], [], [], []
    non_ascii = any(not c.isascii() for _, choices, _ in parsed for c in choices)
    for ctx, choices, label in parsed:
        lls = [next(scores)[0] for _ in choices]
        pred = _argmax(lls)
        pred_norm = _argmax([ll / len(c) if c else ll for ll, c in zip(lls, choices)])
        pred_bytes = _argmax([ll / len(c.encode("utf-8")) if c else ll for ll, c in zip(lls, choices)])
        acc.append(float(pred == label))
        acc_norm.append(float(pred_norm == label))
        acc_bytes.append(float(pred_bytes == label))
        samples.append({"loglikelihoods": lls, "label": label, "pred": pred, "pred_norm": pred_norm})
    metrics = {"acc": sum(acc) / len(acc), "acc_norm": sum(acc_norm) / len(acc_norm)}
    stderr = {"acc": mean_stderr(acc), "acc_norm": mean_stderr(acc_norm)}
    if non_ascii:
        metrics["acc_bytes"], stderr["acc_bytes"] = sum(acc_bytes) / len(acc_bytes), mean_stderr(acc_bytes)
    return EvalResult(task="multiple_choice", metrics=metrics, stderr=stderr, n=len(parsed),
                      seconds=scorer.seconds - seconds, tokens=scorer.tokens - tokens,
                      config={"num_fewshot": num_fewshot, "seed": seed}, samples=samples)
