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


_GROUPS = {
    "perplexity": ("window", "stride", "detokenize"),
    "prompts (multiple_choice, classification, qa)": ("num_fewshot", "fewshot_data", "seed", "labels", "template"),
    "qa generation": ("max_new_tokens", "stop", "strip_think", "chat"),
    "model": ("dtype", "quantize", "device"),
}


@command("eval", aliases={"task": TASK_ALIASES}, groups=_GROUPS)
def eval_command(
    model: str,
    task: Task | None = None,
    data: str | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    out: Path | None = None,
    progress: bool = True,
    window: str | None = None,
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
    quantize: Literal["int8", "int4"] | None = None,
    device: str | None = None,
) -> int:
    """Evaluate a model: perplexity, LAMBADA, multiple choice, QA or classification.

    Prints metrics with standard errors and speed; --out writes them as JSON. Numbers match
    lm-evaluation-harness's `hf` model on the same data (docs/eval.md). Examples:

      gptlab eval out/model --task perplexity --data corpus.txt --stride 512
      gptlab eval out/model --task multiple_choice --data hellaswag.jsonl --limit 500 --out results.json

    Args:
        model: model dir (HF format) or hub id
        task: perplexity, lambada, multiple_choice, qa, classification, or a benchmark (implies its data):
            wikitext-2, hellaswag, arc_easy, arc_challenge, piqa, mmlu
        data: JSONL (text for perplexity), or a benchmark
        limit: only the first N examples
        batch_size: rows per forward pass (changes no number)
        out: write results and per-example records (JSON)
        progress: show progress bars
        window: tokens a window reads (default: context); 512,1024,...: each, charted
        stride: tokens between window ends (default: window)
        detokenize: undo WikiText tokenisation (wikitext-2: on)
        num_fewshot: examples prepended to each prompt
        fewshot_data: draw them from this file (default: data)
        seed: seed of the few-shot draw
        labels: label set in confusion order (default: sorted)
        template: prompt as a format string over row fields
        max_new_tokens: answer length limit
        stop: stop strings (default: newline; --chat: none)
        strip_think: drop <think>...</think> before scoring
        chat: wrap questions in the chat template
        dtype: float32, bfloat16, float16 (default: checkpoint's)
        quantize: int8 or int4 integer weights (default: none)
        device: cpu, cuda, ... (default: cpu)
    """
    if task is None:
        raise GptlabError("--task is required (perplexity, lambada, multiple_choice, qa, classification, "
                          "or a benchmark name such as hellaswag)")
    if out is not None and Path(out).is_dir():
        raise GptlabError(f"--out {out} is a directory; give the path of the JSON file to write")
    windows = _windows(window)
    options = dict(window=windows, stride=stride, detokenize=detokenize, num_fewshot=num_fewshot,
                   fewshot_data=fewshot_data, seed=seed, labels=labels or None,
                   template=template and _unescape(template), max_new_tokens=max_new_tokens,
                   stop=None if stop is None else [_unescape(s) for s in stop], strip_think=strip_think, chat=chat)
    result = evaluate(model, task, data, limit=limit, batch_size=batch_size, dtype=dtype, device=device,
                      quantize=quantize, progress=progress, **options)
    print(result.table())
    if out is not None:
        result.save(out)
        print(f"wrote {out}", file=sys.stderr)
        if "windows" in result.details:
            from gptlab.eval.perplexity import plot_windows

            chart = Path(out).with_suffix(".png")
            plot_windows(result, chart)
            print(f"wrote {chart}", file=sys.stderr)
    elif "windows" in result.details:
        print("(--out FILE.json also writes the chart, as FILE.png)", file=sys.stderr)
    return 0


def _windows(text: str | None) -> int | list[int] | None:
    """--window 1024, or several sizes 512,1024,2048 (perplexity at each, in one run)."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",")]
    if not all(p.lstrip("-").isdigit() for p in parts):
        raise GptlabError(f"--window takes a token count or comma-separated counts (512,1024,2048), got {text!r}")
    sizes = [int(p) for p in parts]
    return sizes[0] if len(sizes) == 1 else sizes

