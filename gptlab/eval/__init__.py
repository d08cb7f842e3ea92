"""Evaluation: perplexity, LAMBADA, multiple choice, QA, classification, and an lm-evaluation-harness adapter.

    from gptlab.eval import evaluate
    result = evaluate("path/to/model", "lambada", "lambada.jsonl", batch_size=32)
    print(result.table())

Importing this package is light: lm_eval and datasets are imported only when a harness model or a
standard benchmark is asked for. docs/eval.md has the formulas; `gptlab eval` is gptlab/cli/eval.py.
"""


def evaluate(*args, **kwargs):
    from gptlab.eval.tasks import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


evaluate.__doc__ = "Evaluate a model on a task; see gptlab.eval.tasks.evaluate."

__all__ = ["evaluate"]
