"""`evaluate(model, task, data, ...)`: the one entry point behind `gptlab eval` and the Python API.

    from gptlab.eval import evaluate
    result = evaluate("path/to/model", "multiple_choice", "hellaswag.jsonl", limit=500, batch_size=32)
    print(result.table()); result.save("results.json")
"""

from __future__ import annotations

import os
from typing import Any

from gptlab.eval.data import BENCHMARKS, load_docs
from gptlab.eval.results import EvalResult
from gptlab.errors import GptlabError
from gptlab.limits import check, check_strings

TASKS = ("perplexity", "lambada", "multiple_choice", "qa", "classification")
TASK_ALIASES = {"classify": "classification"}  # the name `gptlab finetune` used to take
DEFAULT_DATA = {"perplexity": "wikitext-2", "lambada": "lambada"}  # standard sets used when no data is given

# options each task reads; setting another is an error rather than silently ignored
_OPTIONS = {
    "perplexity": {"window", "stride", "detokenize", "field"},
    "lambada": {"field", "bootstrap_iters"},
    "multiple_choice": {"num_fewshot", "fewshot_data", "seed"},
    "classification": {"num_fewshot", "fewshot_data", "seed", "labels", "template"},
    "qa": {"num_fewshot", "fewshot_data", "seed", "template", "max_new_tokens", "stop", "strip_think", "chat",
           "rel_tol"},
}
_DEFAULTS: dict[str, Any] = {
    "window": None, "stride": None, "detokenize": None, "field": "text", "bootstrap_iters": 1000, "num_fewshot": 0,
    "fewshot_data": None, "seed": 1234, "labels": None, "template": None, "max_new_tokens": 64, "stop": None,
    "strip_think": False, "chat": False, "rel_tol": 0.0,
}


def _check_options(opts: dict[str, Any], limit: int | None, batch_size: int) -> None:
    """Values that would run with a silent default or a wrong count: one clear error instead."""
    for name in ("window", "stride", "num_fewshot", "max_new_tokens", "bootstrap_iters", "rel_tol"):
        v = opts.get(name)
        for x in v if isinstance(v, list) else [v]:
            if x is not None:
                check(name, x)
    if limit is not None:
        check("limit", limit)
    check("batch_size", batch_size)
    check_strings("labels", opts.get("labels"), distinct=True)
    if opts.get("stop") is not None and any(not x for x in opts["stop"]):
        raise GptlabError("stop strings must not be empty (an empty one would end every answer at once)")


def evaluate(
    model,
    task: str,
    data: str | os.PathLike | None = None,
    *,
    tokenizer=None,
    limit: int | None = None,
    batch_size: int = 16,
    dtype: str | None = None,
    device: str | None = None,
    quantize: str | None = None,
    progress: bool = True,
    **options: Any,
) -> EvalResult:
    """Evaluate `model` (a model dir / hub id, or a loaded GPT with `tokenizer`) on `task`.

    task: perplexity | lambada | multiple_choice | qa | classification, or a standard benchmark name
      (wikitext-2, lambada, hellaswag, arc_easy, arc_challenge, piqa, mmlu) that implies its task and data.
    data: a JSONL file, a text file (perplexity), or a standard benchmark name.
    options: the task's own settings (window, stride, detokenize, field, bootstrap_iters, num_fewshot,
      fewshot_data, seed, labels, template, max_new_tokens, stop, strip_think, chat, rel_tol).
    """
    task = TASK_ALIASES.get(task, task)
    if task in BENCHMARKS and task not in TASKS:
        if data is not None:
            raise GptlabError(f"task {task!r} is a standard benchmark with its own data; drop --data, or use "
                              f"--task {BENCHMARKS[task].task} with your file")
        task, data = BENCHMARKS[task].task, task
    if task not in TASKS:
        raise GptlabError(f"unknown task {task!r} (tasks: {', '.join(TASKS)}; benchmarks: {', '.join(BENCHMARKS)})")
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        raise GptlabError(f"unknown option(s) {', '.join(unknown)}")
    misplaced = sorted(k for k, v in options.items() if k not in _OPTIONS[task] and v != _DEFAULTS[k])
    if misplaced:
        raise GptlabError(f"option(s) {', '.join(misplaced)} do not apply to task {task}")
    opts = {k: options.get(k, _DEFAULTS[k]) for k in _OPTIONS[task]}
    _check_options(opts, limit, batch_size)
    if data is None:
        if task not in DEFAULT_DATA:
            raise GptlabError(f"task {task} needs --data (a JSONL file)")
        data = DEFAULT_DATA[task]
    source = str(data)
    docs = load_docs(data, limit, text_ok=task == "perplexity")
    if not docs:
        raise GptlabError(f"{source} holds no examples")
    if task == "perplexity" and not any(isinstance(d.get(opts["field"]), str) and d[opts["field"]].strip()
                                        for d in docs):
        raise GptlabError(f"{source} holds no text to measure perplexity on")
    fewshot_docs = load_docs(opts["fewshot_data"]) if opts.get("fewshot_data") else None

    if isinstance(model, (str, os.PathLike)):
        from gptlab.formats import hf
        from gptlab.tokenizer import load_tokenizer

        model_name = str(model)
        tokenizer = tokenizer or load_tokenizer(model)
        model = hf.load(model, dtype=dtype, device=device, quantize=quantize)
    else:
        if tokenizer is None:
            raise GptlabError("pass tokenizer= along with a loaded model")
        if quantize:
            raise GptlabError("quantize= applies to a model path; quantize a loaded model with "
                              "gptlab.models.quant.quantize(model, kind)")
        model_name = getattr(model, "source", type(model).__name__)
    model.eval()
    record = {"model": model_name, "task": task, "data": source, "limit": limit, "batch_size": batch_size}

    if task == "qa":
        from gptlab.eval.qa import evaluate_qa

        result = evaluate_qa(model, tokenizer, docs, batch_size=batch_size, template=opts["template"],
                             max_new_tokens=opts["max_new_tokens"], stop=opts["stop"],
                             strip_thinking=opts["strip_think"], chat=opts["chat"], num_fewshot=opts["num_fewshot"],
                             fewshot_docs=fewshot_docs, seed=opts["seed"], rel_tol=opts["rel_tol"],
                             progress=progress, source=source)
    else:
        from gptlab.eval.scorer import Scorer

        scorer = Scorer(model, tokenizer, batch_size=batch_size, progress=progress)
        if task == "perplexity":
            from gptlab.eval.perplexity import evaluate_perplexity

            detok = opts["detokenize"] or ("wikitext" if source == "wikitext-2" else "none")
            window = opts["window"]
            if isinstance(window, (list, tuple)) and len(window) > 1:  # one run at growing windows
                from gptlab.eval.perplexity import evaluate_perplexity_windows

                result = evaluate_perplexity_windows(scorer, docs, list(window), stride=opts["stride"],
                                                     detokenize=detok, field=opts["field"], source=source)
            else:
                window = window[0] if isinstance(window, (list, tuple)) else window
                result = evaluate_perplexity(scorer, docs, window=window, stride=opts["stride"],
                                             detokenize=detok, field=opts["field"], source=source)
        elif task == "lambada":
            from gptlab.eval.lambada import evaluate_lambada

            result = evaluate_lambada(scorer, docs, field=opts["field"], bootstrap_iters=opts["bootstrap_iters"],
                                      source=source)
        elif task == "multiple_choice":
            from gptlab.eval.multiple_choice import evaluate_multiple_choice

            result = evaluate_multiple_choice(scorer, docs, num_fewshot=opts["num_fewshot"],
                                              fewshot_docs=fewshot_docs, seed=opts["seed"], source=source)
        else:
            from gptlab.eval.classification import evaluate_classification

            result = evaluate_classification(scorer, docs, labels=opts["labels"], template=opts["template"],
                                             num_fewshot=opts["num_fewshot"], fewshot_docs=fewshot_docs,
                                             seed=opts["seed"], source=source)
    result.config = {**record, **result.config}
    return result

