"""`gptlab compare`: models and presets side by side (gptlab.eval.compare)."""

from __future__ import annotations

from pathlib import Path

from gptlab.cli import command
from gptlab.formats.files import check_destination


@command("compare")
def compare_command(models: list[str], data: str | None = None, tasks: str | None = None, bench: bool = False,
                    limit: int | None = None, batch_size: int = 16, dtype: str | None = None, chat: bool = False, out: str = "compare",
                    overwrite: bool = False, progress: bool = True) -> int:
    """Compare models side by side: architecture, cost, and (for models with weights) metrics and speed.

    Presets compare without weights. Writes OUT/report.md, report.html, comparison.json and PNG bar
    charts. docs/compare.md has the columns. Examples:

      gptlab compare gpt2 gpt2-xl qwen2.5-3b qwen3-30b-a3b
      gptlab compare out/a out/b --data val.txt --tasks perplexity,qa=qa.jsonl --bench --out cmp

    Args:
        models: presets (`gptlab models`), model dirs or hub ids
        data: the text for perplexity (and for tasks named without =FILE)
        tasks: comma-separated: perplexity, lambada, multiple_choice, qa, classification, a benchmark, or TASK=FILE
        bench: measure batch-1 greedy decode tokens/s
        limit: only the first N examples of each task
        batch_size: rows per forward pass in the evaluations
        dtype: float32, bfloat16, float16 (default: each checkpoint's)
        chat: qa prompts through each model's chat template (as `eval --task qa --chat`)
        out: output dir (-o)
        overwrite: write into OUT even when it holds files gptlab did not write
        progress: show progress bars
    """
    from gptlab.eval.compare import compare, table_rows, write_report

    check_destination(out, ("comparison.json",), "the comparison dir", overwrite)
    result = compare(models, data=data, tasks=tasks, bench=bench, limit=limit, batch_size=batch_size, dtype=dtype,
                     chat=chat, progress=progress)
    paths = write_report(result, Path(out))
    header, rows = table_rows(result)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    for task, ch in result["qa_changes"].items():
        print(f"{task}: {len(ch['fixed'])} questions fixed, {len(ch['broken'])} broken (strict, first model -> last)")
    print(f"wrote {paths['md']}, {paths['html'].name}, {paths['json'].name} and charts")
    return 0
