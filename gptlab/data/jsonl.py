"""The one JSONL reader: one JSON object per non-blank line, errors that name the file and line.

Every reader of rows (corpora, fine-tuning examples, evaluation data) goes through `read_jsonl`, so a
malformed line is reported the same way everywhere, and can be counted and skipped where the caller asks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError


@dataclass
class Skipped:
    """Rows left out because the caller asked to skip malformed ones: how many, and the first reasons."""

    count: int = 0
    reasons: list[str] = field(default_factory=list)

    def add(self, reason: str) -> None:
        self.count += 1
        if len(self.reasons) < 5:
            self.reasons.append(reason)

    def __str__(self) -> str:
        return f"skipped {self.count} malformed row(s): " + "; ".join(self.reasons) + ("; ..." if self.count > 5 else "")


def reject(skip: Skipped | None, reason: str) -> None:
    """A malformed row: one error saying `reason`, or counted in `skip` when the caller skips such rows."""
    if skip is None:
        raise GptlabError(reason)
    skip.add(reason)


def read_jsonl(path: str | os.PathLike, skip: Skipped | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line. A line that is not a JSON object raises a GptlabError
    naming `path:line`, or is counted in `skip` when one is given; text that is not UTF-8 always raises."""
    p = Path(path)
    if not p.is_file():
        raise GptlabError(f"data file {p} does not exist")
    with p.open("rb") as f:  # lines as bytes, decoded one by one: a bad byte is named by line and column
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise GptlabError(f"{p}:{n}: not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
                                  f"of the line); convert the file to UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                problem = None if isinstance(row, dict) else f"expected a JSON object, got {type(row).__name__}"
            except json.JSONDecodeError as e:
                problem = f"not valid JSON ({e.msg} at column {e.colno})"
            if problem is None:
                yield n, row
            else:
                reject(skip, f"{p}:{n}: {problem}")
