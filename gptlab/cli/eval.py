"""`gptlab eval`: the command-line face of `gptlab.eval.tasks.evaluate`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from gptlab.cli import command
from gptlab.errors import GptlabError
from gptlab.eval.tasks import TASK_ALIASES, evaluate

Task = Literal["perplexity", "lambada", "multiple_choice", "qa", "classification",
               "wikitext-2", "hellaswag", "arc_easy", "arc_challenge", "piqa", "mmlu"]


def _unescape(s: str) -> str:
    """"\\n" typed in a shell is two characters; stop strings mean the newline."""
    return s.replace("\\n", "\n").replace("\\t", "\t")


@command("eval", aliases={"task": TASK_ALIASES})
def eval_command(
    model: str,
    task: Task | None = None,
    data: str | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    out: Path | None = None,
    window: int | None = None,
    stride: int | None = None,
    detokenize: Literal["none", "wikitext"] | None = None,
    num_fewshot: int = 0,
    fewshot_data: str | None = None,
    seed: int = 1234,
    labels: list[str] | None = None,
    template: str | None = None,
    max_new_tokens: int = 64,
    stop: list[str] | None = None,
    strip_think: bool = False,
    chat: bool = False,
    dtype: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> int:
    """Evaluate a model: perplexity, LAMBADA, multiple choice, QA or classification.

    Prints a table of metrics (with standard errors, examples/s and tokens/s) and writes them as JSON
    with --out. Numbers match lm-evaluation-harness's `hf` model on the same data (docs/eval.md).

    Examples:
      gptlab eval out/model --task perplexity --data corpus.txt --stride 512
      gptlab eval out/model --task multiple_choice --data hellaswag.jsonl --limit 500 --out results.json
      gptlab eval out/model --task hellaswag          (fetched with `datasets`; needs network)

    Args:
        model: model directory (HF format) or hub id
        task: what to measure; a benchmark name (hellaswag, wikitext-2, ...) implies its task and data
        data: JSONL file (text file for perplexity), or a standard benchmark name
        limit: evaluate only the first N examples
        batch_size: continuations (or generated answers) per forward pass; does not change any number
        out: write the results (and per-example records) as JSON here
        window: perplexity: tokens a window reads (default: the model's context)
        stride: perplexity: tokens between window ends; smaller = more context per token, more compute
        detokenize: perplexity: undo WikiText tokenisation before scoring (default: on for wikitext-2)
        num_fewshot: examples prepended to each prompt (multiple_choice, classification, qa)
        fewshot_data: draw few-shot examples from this file instead of the evaluated data
        seed: seed of the few-shot draw
        labels: classification: the label set, in confusion-matrix order (default: sorted labels of the data)
        template: classification / qa: prompt as a Python format string over the row's fields
        max_new_tokens: qa: answer length limit
        stop: qa: stop strings (default: a newline; none with --chat); "\\n" is a newline
        strip_think: qa: drop <think>...</think> reasoning before scoring
        chat: qa: wrap each question in the tokenizer's chat template
        dtype: float32, bfloat16 or float16 (default: the checkpoint's)
        device: cpu, cuda, ... (default: cpu)
        progress: show progress bars
    """
    if task is None:
        raise GptlabError("--task is required (perplexity, lambada, multiple_choice, qa, classification, "
                          "or a benchmark name such as hellaswag)")
    options = dict(window=window, stride=stride, detokenize=detokenize, num_fewshot=num_fewshot,
                   fewshot_data=fewshot_data, seed=seed, labels=labels or None,
                   template=template and _unescape(template), max_new_tokens=max_new_tokens,
                   stop=None if stop is None else [_unescape(s) for s in stop], strip_think=strip_think, chat=chat)
    result = evaluate(model, task, data, limit=limit, batch_size=batch_size, dtype=dtype, device=device,
                      progress=progress, **options)
    print(result.table())
    if out is not None:
        result.save(out)
        print(f"wrote {out}", file=sys.stderr)
    return 0

