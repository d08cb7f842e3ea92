"""What an evaluation returns: metrics with standard errors, timing, and a readable table.

Standard errors follow lm-evaluation-harness (lm_eval/api/metrics.py `stderr_for_metric`): a mean (acc,
acc_norm, exact match) gets the sample standard deviation over sqrt(n); perplexity over examples
(exp(-mean loglikelihood), LAMBADA) gets a bootstrap estimate; corpus-weighted ratios (word / byte
perplexity, bits per byte) get none, as in the harness.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


def mean_stderr(values) -> float | None:
    """Sample standard deviation / sqrt(n) (the harness's `mean_stderr`); None for fewer than 2 values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return None
    return float(x.std(ddof=1) / math.sqrt(x.size))


def perplexity(loglikelihoods) -> float:
    """exp(-mean loglikelihood): the harness's `perplexity` aggregation (one loglikelihood per example)."""
    return math.exp(-float(np.mean(np.asarray(loglikelihoods, dtype=np.float64))))


def bootstrap_stderr(statistic, values, iters: int = 1000, seed: int = 1234) -> float | None:
    """Standard deviation of `statistic` over `iters` resamples with replacement (the harness bootstraps
    perplexity the same way, with its own random draws; 0 iterations or < 2 values give None)."""
    x = np.asarray(values, dtype=np.float64)
    if iters <= 0 or x.size < 2:
        return None
    rng = np.random.default_rng(seed)
    stats = [statistic(x[rng.integers(0, x.size, x.size)]) for _ in range(iters)]
    return float(np.std(stats))


@dataclass
class EvalResult:
    """Metrics of one task on one model. `metrics` and `stderr` share keys (stderr None where not defined)."""

    task: str
    metrics: dict[str, float | None]  # None: undefined here (e.g. numeric_acc without numeric questions)
    stderr: dict[str, float | None]
    n: int  # examples (documents for perplexity)
    seconds: float = 0.0  # wall time of the scoring / generation
    tokens: int = 0  # tokens the model read (padding excluded) or generated
    config: dict[str, Any] = field(default_factory=dict)  # model, data and options, for the record
    details: dict[str, Any] = field(default_factory=dict)  # per-class scores, confusion matrix, ...
    samples: list[dict[str, Any]] = field(default_factory=list)  # one record per example

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def examples_per_s(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not samples:
            d.pop("samples")
        d["tokens_per_s"] = self.tokens_per_s
        d["examples_per_s"] = self.examples_per_s
        return d

    def save(self, path: str | Path, samples: bool = True) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(samples=samples), indent=2, ensure_ascii=False, default=_json) + "\n")
        return path

    def table(self) -> str:
        """Metrics as an aligned text table, then throughput, then any per-class table."""
        rows = [("metric", "value", "stderr")]
        for k, v in self.metrics.items():
            se = self.stderr.get(k)
            rows.append((k, _fmt(v), "" if se is None else f"± {_fmt(se)}"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{self.task}  (n={self.n})"]
        for i, r in enumerate(rows):
            lines.append(f"  {r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}".rstrip())
            if i == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        lines.append(f"  {self.seconds:.1f} s, {self.examples_per_s:,.1f} examples/s, {self.tokens_per_s:,.0f} tokens/s")
        if "per_class" in self.details:
            lines += ["", _per_class_table(self.details["per_class"])]
        if "confusion" in self.details:
            lines += ["", _confusion_table(self.details["labels"], self.details["confusion"])]
        return "\n".join(lines)


def _fmt(v: float) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, float) and (abs(v) >= 1e5 or v.is_integer() and abs(v) >= 1000):
        return f"{v:.4g}"
    return f"{v:.4f}"


def _per_class_table(per_class: dict[str, dict[str, float]]) -> str:
    width = max([5] + [len(k) for k in per_class])
    lines = [f"  {'class':<{width}}  precision  recall      f1  support"]
    for label, s in per_class.items():
        lines.append(f"  {label:<{width}}  {s['precision']:9.4f}  {s['recall']:6.4f}  {s['f1']:6.4f}  {s['support']:7d}")
    return "\n".join(lines)


def _confusion_table(labels: list[str], matrix: list[list[int]]) -> str:
    corner = "true \\ pred"
    width = max([len(corner)] + [len(x) for x in labels])
    cols = [max(len(x), max((len(str(r[j])) for r in matrix), default=1)) for j, x in enumerate(labels)]
    lines = ["  " + f"{corner:<{width}}  " + "  ".join(f"{x:>{c}}" for x, c in zip(labels, cols))]
    for label, row in zip(labels, matrix):
        lines.append("  " + f"{label:<{width}}  " + "  ".join(f"{v:>{c}}" for v, c in zip(row, cols)))
    return "\n".join(lines)


def _json(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)
