"""Models side by side (`gptlab compare`): architecture and cost from each Config (presets need no weights),
metrics from `gptlab.eval.evaluate` (the numbers `gptlab eval` prints), decode speed with `bench`.

Writes comparison.json, report.md, report.html (the table and the charts) and PNG bar charts.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError
from gptlab.models.config import Config
from gptlab.models.describe import context_str, mlp_str, norm_str, positions_str
from gptlab.models.presets import FAMILIES, PRESETS
from gptlab.models.stats import count_params, flops_per_token, human, human_bytes, kv_cache_bytes, weight_bytes

ROWS = [  # (key, label) of the table, in order
    ("family", "family"), ("params", "parameters"), ("non_embedding", "non-embedding"), ("active", "active / token"),
    ("layers", "layers"), ("width", "width"), ("heads", "heads / kv heads"), ("context", "context"),
    ("positions", "positions"), ("norm", "norm"), ("mlp", "MLP"), ("vocab", "vocabulary"),
    ("flops_per_token", "FLOPs / token (fwd, 1K ctx)"), ("weights_fp32", "weights fp32"),
    ("weights_bf16", "weights bf16"), ("weights_int8", "weights int8"), ("kv_per_1k", "KV cache / 1K tokens (bf16)"),
]


def _config(spec: str) -> tuple[Config, str, bool]:
    """(config, family, has weights) of a preset name or a model dir / hub id."""
    if spec in PRESETS:
        return Config.from_name(spec), FAMILIES[spec], False
    from gptlab.formats import hf

    try:
        path = hf.resolve(spec, hf.HUB_CONFIG_PATTERNS)
    except GptlabError as e:
        raise GptlabError(f"{spec} is neither a preset (`gptlab models`) nor a model: {e}") from None
    config = hf.read_config(path)
    return config, config.model_type, True


def architecture(config: Config, family: str) -> dict[str, Any]:
    counts = count_params(config)
    seq = min(1024, config.context_length)
    return {
        "family": family, "params": counts["total"], "non_embedding": counts["non_embedding"],
        "active": counts["active"], "layers": config.n_layer, "width": config.n_embd,
        "heads": f"{config.n_head}/{config.n_kv_head}", "context": config.context_length,
        "positions": positions_str(config), "norm": norm_str(config), "mlp": mlp_str(config),
        "vocab": config.vocab_size, "flops_per_token": flops_per_token(config, seq),
        "weights_fp32": weight_bytes(config, "float32"), "weights_bf16": weight_bytes(config, "bfloat16"),
        "weights_int8": counts["total"],  # one byte a weight (before per-channel scales)
        "kv_per_1k": kv_cache_bytes(config, 1024, 1, "bfloat16"),
    }


def parse_tasks(text: str | None, data: str | None) -> list[tuple[str, str | None]]:
    """"perplexity,qa=qa.jsonl,hellaswag" -> [(task, data)]: a bare task reads --data (benchmarks their own)."""
    out = []
    for part in (text or "perplexity").split(","):
        task, _, source = part.strip().partition("=")
        out.append((task, source or data))
    return out


def _bench(spec: str, dtype: str | None, n_tokens: int = 64, rounds: int = 3) -> float:
    """Batch-1 greedy decode, tokens per second (the median of `rounds`, after one warm-up)."""
    import torch

    from gptlab import load
    from gptlab.infer.generate import generate_ids

    model = load(spec, dtype=dtype)
    prompt = [[1, 2, 3, 4, 5, 6, 7, 8]]
    n = min(n_tokens, model.config.context_length - len(prompt[0]))
    with torch.no_grad():
        generate_ids(model, prompt, max_new_tokens=4, eos_id=[])
        rates = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            generate_ids(model, prompt, max_new_tokens=n, eos_id=[])
            rates.append(n / (time.perf_counter() - t0))
    return sorted(rates)[len(rates) // 2]


def compare(models: list[str], data: str | None = None, tasks: str | None = None, bench: bool = False,
            limit: int | None = None, batch_size: int = 16, dtype: str | None = None, chat: bool = False,
            progress: bool = True) -> dict[str, Any]:
    """The comparison as a dict: {"models": [{"name", "weights", "architecture", "metrics", "decode_tok_s"}]},
    and for qa tasks "qa_changes": the questions the last model answers strictly right and the first wrong
    (fixed), and the reverse (broken). chat: qa prompts through each tokenizer's chat template."""
    from gptlab.eval import evaluate

    if not models:
        raise GptlabError("name at least one model or preset to compare")
    if len(set(models)) != len(models):
        raise GptlabError("each model once: " + ", ".join(sorted({m for m in models if models.count(m) > 1})))
    wanted = parse_tasks(tasks, data) if (data or tasks) else []
    entries = []
    answers: dict[str, list[list[dict]]] = {}  # qa task -> each model's scored answers
    for spec in models:
        config, family, has_weights = _config(spec)
        entry: dict[str, Any] = {"name": spec, "weights": has_weights, "architecture": architecture(config, family),
                                 "metrics": {}}
        if has_weights:
            for task, source in wanted:
                opts = {"chat": True} if chat and task == "qa" else {}
                r = evaluate(spec, task, source, limit=limit, batch_size=batch_size, dtype=dtype, progress=progress,
                             **opts)
                entry["metrics"][task] = r.metrics
                if task == "qa":
                    answers.setdefault(task, []).append(r.samples)
            if bench:
                entry["decode_tok_s"] = _bench(spec, dtype)
        entries.append(entry)
    changes = {task: qa_changes(runs) for task, runs in answers.items() if len(runs) >= 2}
    return {"models": entries, "tasks": [t for t, _ in wanted], "data": data, "limit": limit, "qa_changes": changes}


def qa_changes(runs: list[list[dict]]) -> dict[str, list[dict]]:
    """Questions whose strict score differs between the first model's answers and the last's."""
    out: dict[str, list[dict]] = {"fixed": [], "broken": []}
    for before, after in zip(runs[0], runs[-1]):
        if before["strict"] != after["strict"]:
            out["fixed" if after["strict"] else "broken"].append(
                {"question": after["question"], "reference": after["references"][0], "before": before["answer"],
                 "after": after["answer"]})
    return out


# ---------------------------------------------------------------------------------------------------------
# the report


def _cell(key: str, value: Any) -> str:
    if key in ("params", "non_embedding", "active", "vocab"):
        return human(value) if key != "vocab" else f"{value:,}"
    if key == "flops_per_token":
        return human(value)
    if key.startswith("weights") or key == "kv_per_1k":
        return human_bytes(value)
    if key == "context":
        return context_str(value)
    return str(value)


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    models = result["models"]
    header = ["", *[m["name"] for m in models]]
    rows = [[label, *[_cell(key, m["architecture"][key]) for m in models]] for key, label in ROWS]
    metric_keys = []
    for m in models:
        for task, ms in m["metrics"].items():
            metric_keys += [(task, k) for k in ms if (task, k) not in metric_keys]
    for task, k in metric_keys:
        vals = [m["metrics"].get(task, {}).get(k) for m in models]
        rows.append([f"{task}: {k}", *["-" if v is None else f"{v:.4f}" for v in vals]])
    if any("decode_tok_s" in m for m in models):
        rows.append(["decode tok/s (batch 1)", *[f"{m['decode_tok_s']:.1f}" if "decode_tok_s" in m else "-"
                                                 for m in models]])
    return header, rows


def markdown(result: dict[str, Any], charts: list[str]) -> str:
    header, rows = table_rows(result)
    lines = ["# Model comparison", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "Presets are compared without weights (architecture and cost only). Metrics are exactly "
              "`gptlab eval`'s on " + (f"`{result['data']}`" if result["data"] else "each task's data") +
              (f" (first {result['limit']} examples)" if result["limit"] else "") + ".", ""]
    lines += [f"![{c}]({c})" for c in charts]
    for task, ch in result.get("qa_changes", {}).items():
        first, last = result["models"][0]["name"], result["models"][-1]["name"]
        lines += ["", f"## {task}: {len(ch['fixed'])} fixed, {len(ch['broken'])} broken (strict, {first} -> {last})"]
        for kind in ("fixed", "broken"):
            if ch[kind]:
                lines += ["", f"| {kind} | reference | {first} | {last} |", "|---|---|---|---|"]
                lines += [f"| {_md(c['question'])} | {_md(c['reference'])} | {_md(c['before'])} | {_md(c['after'])} |"
                          for c in ch[kind][:MAX_SHOWN]]
                if len(ch[kind]) > MAX_SHOWN:
                    lines.append(f"\n({len(ch[kind]) - MAX_SHOWN} more in comparison.json)")
    return "\n".join(lines) + "\n"


MAX_SHOWN = 30  # fixed / broken questions listed per task in the reports (all are in comparison.json)


def _md(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")[:160] or "(empty)"


def html_report(result: dict[str, Any], charts: list[str]) -> str:
    header, rows = table_rows(result)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    imgs = "".join(f'<figure><img src="{html.escape(c)}" alt="{html.escape(c)}"></figure>' for c in charts)
    for task, ch in result.get("qa_changes", {}).items():
        first, last = (html.escape(result["models"][i]["name"]) for i in (0, -1))
        imgs += f"<h2>{html.escape(task)}: {len(ch['fixed'])} fixed, {len(ch['broken'])} broken (strict)</h2>"
        for kind in ("fixed", "broken"):
            if ch[kind]:
                imgs += (f"<table><tr><th>{kind}</th><th>reference</th><th>{first}</th><th>{last}</th></tr>" + "".join(
                    "<tr>" + "".join(f"<td>{html.escape(c[k])}</td>" for k in ("question", "reference", "before", "after"))
                    + "</tr>" for c in ch[kind][:MAX_SHOWN]) + "</table>")
    return ("<!doctype html><meta charset=utf-8><title>gptlab compare</title>"
            "<style>body{font:14px system-ui,sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
            "img{max-width:640px}</style>"
            f"<h1>Model comparison</h1><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{imgs}\n")


def bar_charts(result: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    names = [m["name"] for m in models]
    files = []
    series = [("params.png", "parameters", [m["architecture"]["params"] for m in models], True),
              ("flops.png", "forward FLOPs per token (1K context)", [m["architecture"]["flops_per_token"] for m in models], True),
              ("memory.png", "weights in bf16 (bytes)", [m["architecture"]["weights_bf16"] for m in models], True)]
    for task in result["tasks"]:
        if task == "qa":
            files.append(_qa_chart(result, out))
            continue
        key = next((k for k in ("bits_per_byte", "acc_norm", "acc", "exact_match") if any(
            k in m["metrics"].get(task, {}) for m in models)), None)
        if key:
            series.append((f"{task}.png", f"{task}: {key}", [m["metrics"].get(task, {}).get(key) for m in models], False))
    if any("decode_tok_s" in m for m in models):
        series.append(("decode.png", "decode tokens/s (batch 1)", [m.get("decode_tok_s") for m in models], False))
    for fname, title, values, log in series:
        fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(names) + 2), 3.4), constrained_layout=True)
        shown = [v if v is not None else 0 for v in values]
        bars = ax.bar(range(len(names)), shown, color="C0")
        ax.set_xticks(range(len(names)), names, rotation=20 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center")
        ax.set_title(title, fontsize=10)
        if log and min(shown) > 0:
            ax.set_yscale("log")
        for b, v in zip(bars, values):
            ax.annotate("-" if v is None else (human(v) if log else f"{v:.3g}"), (b.get_x() + b.get_width() / 2,
                        b.get_height()), ha="center", va="bottom", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        files.append(fname)
    return files


QA_KEYS = ("exact", "f1", "contains", "strict", "numeric_acc")


def _qa_chart(result: dict[str, Any], out: Path) -> str:
    """qa.png: the lenient and strict scores, a group of bars per model."""
    import matplotlib.pyplot as plt

    models = [m for m in result["models"] if "qa" in m["metrics"]]
    fig, ax = plt.subplots(figsize=(max(5.5, 1.6 * len(models) + 3), 3.6), constrained_layout=True)
    width = 0.8 / max(1, len(models))
    for i, m in enumerate(models):
        vals = [m["metrics"]["qa"].get(k) or 0.0 for k in QA_KEYS]
        bars = ax.bar([j + (i - (len(models) - 1) / 2) * width for j in range(len(QA_KEYS))], vals, width,
                      label=m["name"], color=f"C{i}")
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.0%}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(QA_KEYS)), ["exact", "F1", "contains", "strict", "numeric (strict)"])
    ax.set_ylim(0, 1.1)
    ax.set_title("qa: lenient (exact, F1, contains) and strict scores", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(out / "qa.png", dpi=110)
    plt.close(fig)
    return "qa.png"


def write_report(result: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    charts = bar_charts(result, out)
    (out / "comparison.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown(result, charts), encoding="utf-8")
    (out / "report.html").write_text(html_report(result, charts), encoding="utf-8")
    return {"json": out / "comparison.json", "md": out / "report.md", "html": out / "report.html"}
