"""GPT-1's task-aware input transformations (Radford et al. 2018, sec. 3.3 and Figure 1): structured rows
become token sequences a causal LM reads in one pass, each ending in an extract token whose hidden state
feeds the head.

    task        row fields                               sequences per row
    entailment  premise, hypothesis, label               <start> premise <delim> hypothesis <extract>
    similarity  sentence1, sentence2, label              both orders (a, b) and (b, a); their heads summed
    choice      context, choices (list), label (index)   one <start> context <delim> choice <extract> per
                                                         choice; softmax across the choices' scores

The start, delimiter and extract tokens are added to the tokenizer when it has none (`task_tokens`); the
model's vocabulary grows to match (gptlab/train/finetune.py). Labels of entailment and similarity are class
names or integers as for classification; a choice label is the index of the right choice (or its text).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from gptlab.data.examples import IGNORE_INDEX, label_ids
from gptlab.data.jsonl import Skipped, read_jsonl, reject
from gptlab.errors import GptlabError

GPT1_TASKS = ("entailment", "similarity", "choice")
FIELDS = {"entailment": ("premise", "hypothesis"), "similarity": ("sentence1", "sentence2"),
          "choice": ("context", "choices")}
TOKENS = ("<|start|>", "<|delim|>", "<|extract|>")


@dataclass(frozen=True)
class TaskTokens:
    start: int
    delim: int
    extract: int


def task_tokens(tokenizer) -> tuple[TaskTokens, int]:
    """The ids of the start, delimiter and extract tokens, adding those the tokenizer lacks as special tokens;
    and how many were added."""
    from tokenizers import AddedToken

    missing = [t for t in TOKENS if tokenizer.token_id(t) is None]
    if missing:
        tokenizer.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        extra = list(tokenizer.config.get("additional_special_tokens") or [])
        tokenizer.config["additional_special_tokens"] = extra + [t for t in missing if t not in extra]
    return TaskTokens(*(tokenizer.token_id(t) for t in TOKENS)), len(missing)


@dataclass
class TaskRows:
    examples: list[tuple[list[list[int]], int]]  # (the row's token sequences, label id)
    names: list[str]  # label id -> name (choice: "0", "1", ... the choice positions)
    truncated: int = 0  # rows whose first text was cut to fit seq_len
    skipped: Skipped | None = None

    def summary(self) -> str:
        out = f"{len(self.examples):,} rows, {len(self.examples[0][0])} sequence(s) each, labels {self.names}"
        if self.truncated:
            out += f"; {self.truncated} cut to fit"
        return out + (f"; {self.skipped}" if self.skipped and self.skipped.count else "")


def _check(task: str, row: dict[str, Any]) -> str | None:
    a, b = FIELDS[task]
    if not isinstance(row.get(a), str) or not row[a]:
        return f"field {a!r} must be a non-empty string"
    if task == "choice":
        choices = row.get(b)
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            return f"field {b!r} must be a list of at least two non-empty strings"
        label = row.get("label")
        if isinstance(label, str) and label in choices:
            return None
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            return f"field 'label' must be the index (0 .. {len(choices) - 1}) or the text of the right choice"
        return None
    if not isinstance(row.get(b), str) or not row[b]:
        return f"field {b!r} must be a non-empty string"
    label = row.get("label")
    if isinstance(label, bool) or not isinstance(label, (int, str)) or (isinstance(label, int) and label < 0):
        return f"field 'label' must be a class name or a non-negative integer, got {label!r}"
    return None


def _sequence(first: list[int], second: list[int], tokens: TaskTokens, seq_len: int) -> tuple[list[int], bool]:
    """<start> first <delim> second <extract>, cutting the start of `first` (then the end of `second`) to fit."""
    room = seq_len - 3
    if room < 2:
        raise GptlabError(f"seq-len {seq_len} leaves no room for a task's two texts and its three markers")
    cut = len(first) + len(second) > room
    if cut:
        second = second[: room - 1]  # at least one token of the first text stays
        first = first[len(first) - (room - len(second)):]  # its end, next to the second text
    return [tokens.start, *first, tokens.delim, *second, tokens.extract], cut


def load_task_rows(path: str | os.PathLike, task: str, tokenizer, tokens: TaskTokens, seq_len: int,
                   names: list[str] | None = None, skip_bad: bool = False) -> TaskRows:
    """Read and transform the rows of a GPT-1 task file. names: the training split's labels (validation)."""
    if task not in GPT1_TASKS:
        raise GptlabError(f"unknown GPT-1 task {task!r} (one of {', '.join(GPT1_TASKS)})")
    skip = Skipped() if skip_bad else None
    rows: list[tuple[int, dict[str, Any]]] = []
    for n, row in read_jsonl(path, skip):
        problem = _check(task, row)
        if problem is None and task == "choice" and rows and len(row["choices"]) != len(rows[0][1]["choices"]):
            problem = f"{len(row['choices'])} choices where the first row has {len(rows[0][1]['choices'])}"
        if problem:
            reject(skip, f"{path}:{n}: {problem}")
            continue
        rows.append((n, row))
    if not rows:
        raise GptlabError(f"{path} gave no usable examples" + (f" ({skip})" if skip and skip.count else ""))

    if task == "choice":
        k = len(rows[0][1]["choices"])
        names = names or [str(i) for i in range(k)]
        if len(names) != k:
            raise GptlabError(f"{path}: rows have {k} choices, the training data {len(names)}")
        labels = [r["label"] if isinstance(r["label"], int) else r["choices"].index(r["label"]) for _, r in rows]
    else:
        labels, names = label_ids(path, [(n, r["label"]) for n, r in rows], names, task)

    a, b = FIELDS[task]
    firsts = tokenizer.encode_batch([r[a] for _, r in rows])
    if task == "choice":
        seconds = [tokenizer.encode_batch(r[b]) for _, r in rows]
    else:
        seconds = tokenizer.encode_batch([r[b] for _, r in rows])
    examples, truncated = [], 0
    for first, second, label in zip(firsts, seconds, labels):
        if task == "entailment":
            pairs = [(first, second)]
        elif task == "similarity":
            pairs = [(first, second), (second, first)]  # no inherent order: both, heads summed
        else:
            pairs = [(first, choice) for choice in second]
        made = [_sequence(x, y, tokens, seq_len) for x, y in pairs]
        truncated += any(cut for _, cut in made)
        examples.append(([seq for seq, _ in made], label))
    return TaskRows(examples, list(names), truncated, skip)


class GroupCollate:
    """Rows of several sequences -> input_ids (B * n, T) right-padded, labels (B,), and lm_labels (B * n, T):
    each token's next token (IGNORE_INDEX past the sequence) for the auxiliary language-modelling loss."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[tuple[list[list[int]], int]]) -> dict[str, torch.Tensor]:
        seqs = [s for group, _ in rows for s in group]
        T = max(len(s) for s in seqs)
        x = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        lm = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
        for r, s in enumerate(seqs):
            x[r, : len(s)] = torch.tensor(s, dtype=torch.long)
            lm[r, : len(s) - 1] = x[r, 1: len(s)]
        return {"input_ids": x, "labels": torch.tensor([y for _, y in rows], dtype=torch.long), "lm_labels": lm}
