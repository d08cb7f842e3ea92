"""Training runs as a scaling study reads them: a CSV or JSONL of `params`, `tokens` (or `flops`) and `loss`.

One row per run. `flops` without `tokens` means tokens = flops / (6 params), the convention of Kaplan et
al. (2020) and Hoffmann et al. (2022); with both, both are kept (the sweep writes both, counted by
gptlab.models.stats). Other columns (name, seed, ...) are carried along. Every value is checked: a missing
column, or a value that is not a positive finite number, is one error naming the file and the row.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gptlab.errors import GptlabError


@dataclass
class Runs:
    params: np.ndarray  # N, parameters (the sweep counts them without the embeddings' lookup, see docs)
    tokens: np.ndarray  # D, training tokens
    flops: np.ndarray  # C, training compute
    loss: np.ndarray  # the final (validation) loss, nats per token
    extra: list[dict[str, Any]] = field(default_factory=list)  # the other columns of each row
    source: str = ""

    def __len__(self) -> int:
        return len(self.loss)

    def subset(self, keep: np.ndarray) -> "Runs":
        idx = np.flatnonzero(keep) if keep.dtype == bool else keep
        return Runs(self.params[idx], self.tokens[idx], self.flops[idx], self.loss[idx],
                    [self.extra[i] for i in idx], self.source)


def _number(value: Any, where: str, column: str) -> float:
    try:
        x = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        raise GptlabError(f"{where}: {column!r} must be a positive number, got {value!r}") from None
    if not math.isfinite(x) or x <= 0:
        raise GptlabError(f"{where}: {column!r} must be a positive number, got {value!r}")
    return x


def read_runs(path: str | os.PathLike, min_runs: int = 1) -> Runs:
    """Runs from a .csv (a header row) or .jsonl file; `min_runs`: fewer is an error (a fit needs more
    runs than it has parameters)."""
    p = Path(path)
    if not p.is_file():
        raise GptlabError(f"runs file {p} does not exist")
    rows: list[tuple[str, dict[str, Any]]] = []
    if p.suffix.lower() in (".jsonl", ".json"):
        from gptlab.data.jsonl import read_jsonl

        rows = [(f"{p}:{n}", row) for n, row in read_jsonl(p)]
    else:
        try:
            with open(p, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                rows = [(f"{p}:{i + 2}", dict(r)) for i, r in enumerate(reader) if any((v or "").strip()
                                                                                       for v in r.values())]
                header = reader.fieldnames or []
        except (UnicodeDecodeError, csv.Error) as e:
            raise GptlabError(f"{p} is not a readable CSV file: {e}") from None
        for need in ("params", "loss"):
            if need not in header:
                raise GptlabError(f"{p}: the header has no {need!r} column (columns: {', '.join(header) or 'none'})")
        if "tokens" not in header and "flops" not in header:
            raise GptlabError(f"{p}: the header needs a 'tokens' or a 'flops' column")
    N, D, C, L, extra = [], [], [], [], []
    for where, row in rows:
        for need in ("params", "loss"):
            if row.get(need) in (None, ""):
                raise GptlabError(f"{where}: no {need!r} value")
        n = _number(row["params"], where, "params")
        has_d = row.get("tokens") not in (None, "")
        has_c = row.get("flops") not in (None, "")
        if not has_d and not has_c:
            raise GptlabError(f"{where}: needs 'tokens' or 'flops'")
        d = _number(row["tokens"], where, "tokens") if has_d else None
        c = _number(row["flops"], where, "flops") if has_c else None
        d = d if d is not None else c / (6 * n)
        c = c if c is not None else 6 * n * d
        N.append(n)
        D.append(d)
        C.append(c)
        L.append(_number(row["loss"], where, "loss"))
        extra.append({k: v for k, v in row.items() if k not in ("params", "tokens", "flops", "loss")})
    if len(L) < min_runs:
        raise GptlabError(f"{p} has {len(L)} run(s); the fit needs at least {min_runs}")
    return Runs(np.array(N), np.array(D), np.array(C), np.array(L), extra, str(p))


def append_run(path: Path, record: dict[str, Any]) -> None:
    """One finished run's record, appended to a runs.jsonl (the sweep's log; resumable)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def isoflop_groups(runs: Runs, gap: float = 1.05, span: float = 1.25) -> list[np.ndarray]:
    """Indices of runs sharing one compute budget, each group with >= 3 model sizes, by budget. Runs sorted by
    compute start a new group where one's compute exceeds the previous run's by more than `gap` x; a group
    whose compute spreads over more than `span` x is no single budget and is dropped (a sweep's budgets are
    exact; runs spread along the compute axis form no IsoFLOP groups)."""
    order = np.argsort(runs.flops)
    groups: list[list[int]] = []
    for i in order:
        if groups and runs.flops[i] <= gap * runs.flops[groups[-1][-1]]:
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    return [np.array(g) for g in groups
            if len(np.unique(runs.params[g])) >= 3 and runs.flops[g].max() <= span * runs.flops[g].min()]
