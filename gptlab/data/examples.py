"""Fine-tuning data: JSONL rows -> token rows with next-token labels, the collate that pads them, and the
numbered batches the training loop reads.

Row shapes read from JSONL (one JSON object per line):
  {"text": ...}                                           plain text (task lm: every token is trained)
  {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}   chat (task sft)
  {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}   ShareGPT, read as chat
  {"instruction": ..., "input": ..., "output": ...}       Alpaca, read as one user and one assistant turn
  {"prompt": ..., "completion"|"response": ...}           read as one user and one assistant turn
  {"question": ..., "answer": ...}                        QA rows (synth qa, eval --task qa), the same way
  {"text": ..., "label": ...}                             classification (`load_class_rows`)

A malformed row is an error naming its line, unless the caller asks to skip bad rows; then they are counted
and the first reasons kept, never dropped silently.

SFT renders a conversation with the tokenizer's chat template (or INSTRUCTION_TEMPLATE when it has none) and
trains only on the assistant turns: each turn's text is what rendering messages[:i+1] adds to rendering
messages[:i] with the generation prompt, so the prompt the model sees at inference is exactly what was masked.
Each answer ends with the tokenizer's EOS (appended when the template does not put it there), so generation
learns to stop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gptlab.data.jsonl import Skipped, read_jsonl, reject
from gptlab.errors import GptlabError

IGNORE_INDEX = -100  # label of a position that adds nothing to the loss (torch's cross_entropy ignore_index)

# For base models without a chat template (GPT-2 style): Alpaca-like headers, and EOS closing every answer.
# It is saved with the fine-tuned model's tokenizer, so `generate`/`chat` render prompts the same way.
INSTRUCTION_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n\\n### Response:\\n' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


# ---------------------------------------------------------------------------------------------------------
# reading rows


def _str(row: dict, key: str, where: str) -> str:
    v = row.get(key)
    if not isinstance(v, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    return v


def to_messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """One row in any of the chat shapes above as a list of {role, content}; raises ValueError."""
    if "messages" in row or "conversations" in row:
        key = "messages" if "messages" in row else "conversations"
        turns = row[key]
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{where}: {key!r} must be a non-empty list")
        out = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict):
                raise ValueError(f"{where}: {key}[{i}] is not an object")
            if key == "messages":
                role, content = t.get("role"), t.get("content")
            else:
                role, content = _SHAREGPT_ROLES.get(t.get("from")), t.get("value")
            if role not in ROLES:
                raise ValueError(f"{where}: {key}[{i}] has role {t.get('role', t.get('from'))!r} "
                                 f"(expected system, user or assistant)")
            if not isinstance(content, str):
                raise ValueError(f"{where}: {key}[{i}] content must be a string")
            out.append({"role": role, "content": content})
    elif "instruction" in row:
        user = _str(row, "instruction", where)
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise ValueError(f"{where}: field 'input' must be a string")
        out = [{"role": "user", "content": f"{user}\n\n{extra}" if extra else user},
               {"role": "assistant", "content": _str(row, "output", where)}]
        if isinstance(row.get("system"), str) and row["system"]:
            out.insert(0, {"role": "system", "content": row["system"]})
    elif "prompt" in row:
        answer = "completion" if "completion" in row else "response"
        out = [{"role": "user", "content": _str(row, "prompt", where)},
               {"role": "assistant", "content": _str(row, answer, where)}]
    elif "question" in row:  # QA rows (gptlab synth qa, eval --task qa); a list of answers trains on the first
        answer = row.get("answer", row.get("answers"))
        if isinstance(answer, list) and answer:
            answer = answer[0]
        if not isinstance(answer, str):
            raise ValueError(f"{where}: field 'answer' must be a string (or a list of strings)")
        out = [{"role": "user", "content": _str(row, "question", where)}, {"role": "assistant", "content": answer}]
    else:
        raise ValueError(f"{where}: expected 'messages', 'conversations', 'instruction'/'output', "
                         f"'prompt'/'completion' or 'question'/'answer' (found keys: {', '.join(sorted(row)) or 'none'})")
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where}: no assistant turn to learn from")
    return out


def render_prompt(tokenizer, prompt: Any, where: str) -> str:
    """A prompt to generate from: text as it is, or chat messages through the chat template (a template-less
    tokenizer gets INSTRUCTION_TEMPLATE) with the generation prompt; a GptlabError naming `where` otherwise."""
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt:
        ensure_chat_template(tokenizer)
        try:
            turns = to_messages({"messages": prompt + [{"role": "assistant", "content": ""}]}, where)[:-1]
        except ValueError as e:
            raise GptlabError(str(e)) from None
        return tokenizer.apply_chat_template(turns, add_generation_prompt=True)
    raise GptlabError(f"{where}: 'prompt' must be non-empty text or a list of chat messages")


# ---------------------------------------------------------------------------------------------------------
# rows -> tokens with a loss mask


def ensure_chat_template(tokenizer) -> bool:
    """Give a template-less tokenizer INSTRUCTION_TEMPLATE (it needs an EOS token); True when it was added."""
    if tokenizer.chat_template:
        return False
    if tokenizer.eos_token is None or tokenizer.eos_id is None:
        raise GptlabError("this tokenizer has neither a chat template nor an EOS token; SFT needs one of them")
    tokenizer.chat_template = INSTRUCTION_TEMPLATE
    return True


def encode_chat(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """(token ids, trained flags): True exactly on the assistant turns' tokens (answer + end of turn)."""
    ids: list[int] = []
    trained: list[bool] = []
    done = ""  # text rendered so far

    def add(text: str, train: bool) -> None:
        new = tokenizer.encode(text)
        ids.extend(new)
        trained.extend([train] * len(new))

    eos = tokenizer.eos_id
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise GptlabError(
                "the chat template does not render conversations incrementally (the prompt of turn "
                f"{i} is not a prefix of the rendered turn), so assistant tokens cannot be located"
            )
        add(prompt[len(done):], False)
        start = len(ids)
        add(full[len(prompt):], True)
        if eos is not None and eos not in ids[start:]:
            ids.append(eos)  # the template ends turns without EOS: add it so the model learns to stop
            trained.append(True)
        done = full
    return ids, trained


def encode_text(tokenizer, text: str) -> tuple[list[int], list[bool]]:
    """Plain language modelling: every token is trained, EOS closes the document."""
    ids = tokenizer.encode(text)
    if tokenizer.eos_id is not None:
        ids.append(tokenizer.eos_id)
    return ids, [True] * len(ids)


@dataclass
class Encoded:
    """Tokenized examples (ids, trained flags) and what reading them left out or cut."""

    examples: list[tuple[list[int], list[bool]]]
    truncated: int = 0  # sft: examples cut to the context length
    split: int = 0  # lm: documents longer than the context, split into several examples
    dropped: int = 0  # examples with nothing left to train on after cutting
    skipped: Skipped = field(default_factory=Skipped)

    def summary(self) -> str:
        notes = [f"{len(self.examples)} examples"]
        if self.truncated:
            notes.append(f"{self.truncated} cut to the context length")
        if self.split:
            notes.append(f"{self.split} long documents split into context-length windows")
        if self.dropped:
            notes.append(f"{self.dropped} dropped (no answer tokens left after cutting)")
        if self.skipped.count:
            notes.append(str(self.skipped))
        return ", ".join(notes)


def encode_file(path, tokenizer, task: str, seq_len: int, skip_bad: bool = False) -> Encoded:
    """Read a JSONL file for task "sft" (masked chat) or "lm" (plain text). An sft example is cut to
    seq_len + 1 tokens (seq_len model inputs after the shift); an lm document is split into such windows."""
    skip = Skipped() if skip_bad else None
    out = Encoded([])
    if task == "sft":
        ensure_chat_template(tokenizer)
    for n, row in read_jsonl(path, skip):
        where = f"{path}:{n}"
        try:
            if task == "sft":
                ids, trained = encode_chat(tokenizer, to_messages(row, where))
            else:
                ids, trained = encode_text(tokenizer, _str(row, "text", where))
        except ValueError as e:
            if skip is None:
                raise GptlabError(str(e)) from None
            skip.add(str(e))
            continue
        if len(ids) > seq_len + 1 and task == "lm":
            # a long document becomes consecutive windows sharing one token, so every token is a target once
            out.split += 1
            out.examples += [(ids[i:i + seq_len + 1], trained[i:i + seq_len + 1]) for i in range(0, len(ids) - 1, seq_len)]
            continue
        if len(ids) > seq_len + 1:
            ids, trained = ids[: seq_len + 1], trained[: seq_len + 1]
            out.truncated += 1
        if not any(trained[1:]):
            out.dropped += 1  # a prompt longer than the context: its answer was cut away entirely
            continue
        out.examples.append((ids, trained))
    out.skipped = skip or Skipped()
    if not out.examples:
        raise GptlabError(f"{path} gave no usable examples" + (f" ({skip})" if skip and skip.count else ""))
    return out


def split(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded random `fraction` held out (at least one example when fraction > 0)."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    n_val = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(perm[:n_val])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def shift(ids: list[int], trained: list[bool]) -> tuple[list[int], list[int]]:
    """Inputs ids[:-1] and aligned next-token labels ids[1:], IGNORE_INDEX where not trained (prompt tokens)."""
    return ids[:-1], [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], trained[1:])]


def to_rows(examples: list[tuple[list[int], list[bool]]], seq_len: int, pack: bool = False,
            seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Model rows (input_ids, labels). pack: concatenate examples, in a seeded random order, into rows of up to
    seq_len + 1 tokens so short examples waste no padding; attention then crosses example boundaries (as in
    GPT pretraining), while each example's own labels stay as they were."""
    if pack:
        examples = _pack(examples, seq_len + 1, seed)
    return [shift(ids, trained) for ids, trained in examples]


def _pack(examples, size: int, seed: int):
    """Greedy packing: fill a row until the next example does not fit."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    rows, ids, tr = [], [], []
    for i in order:
        e_ids, e_tr = examples[i]
        if ids and len(ids) + len(e_ids) > size:
            rows.append((ids, tr))
            ids, tr = [], []
        ids, tr = ids + e_ids, tr + e_tr
    rows.append((ids, tr))
    return rows


def trained_tokens(rows: list[tuple[list[int], list[int]]]) -> int:
    return sum(sum(1 for y in labels if y != IGNORE_INDEX) for _, labels in rows)


class Collate:
    """Right-pad rows to the longest in the batch: inputs with pad_id, token labels with IGNORE_INDEX; a row
    whose label is one int (classification) gives a (B,) label tensor."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[tuple[list[int], Any]]) -> dict[str, torch.Tensor]:
        T = max(len(ids) for ids, _ in rows)
        x = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        for r, (ids, _) in enumerate(rows):
            x[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        if isinstance(rows[0][1], int):
            return {"input_ids": x, "labels": torch.tensor([y for _, y in rows], dtype=torch.long)}
        y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        for r, (_, labels) in enumerate(rows):
            y[r, : len(labels)] = torch.tensor(labels, dtype=torch.long)
        return {"input_ids": x, "labels": y}


# ---------------------------------------------------------------------------------------------------------
# classification rows


@dataclass
class ClassRows:
    examples: list[tuple[list[int], int]]  # (token ids, class id)
    names: list[str]  # class id -> name
    truncated: int = 0  # texts cut to seq_len tokens
    skipped: Skipped | None = None

    def summary(self) -> str:
        notes = [f"{len(self.examples)} examples, {len(self.names)} classes"]
        if self.truncated:
            notes.append(f"{self.truncated} cut to the context length")
        if self.skipped and self.skipped.count:
            notes.append(str(self.skipped))
        return ", ".join(notes)


def label_ids(path, raw: list[tuple[int, int | str]], names: list[str] | None,
              task: str = "classification") -> tuple[list[int], list[str]]:
    """Class ids of (line, label) pairs, and the class names: `names` (the training split's), or derived from
    these labels (0..max for integers, sorted for strings). A label outside the names names its line."""
    if names is None:
        if all(isinstance(lab, int) for _, lab in raw):
            names = [str(i) for i in range(max(lab for _, lab in raw) + 1)]
        elif all(isinstance(lab, str) for _, lab in raw):
            names = sorted({lab for _, lab in raw})
        else:
            raise GptlabError(f"{path}: labels mix integers and strings; use one kind")
        if len(names) < 2:
            raise GptlabError(f"{path}: {task} needs at least two classes, found {names}")
    index = {name: i for i, name in enumerate(names)}
    labels = []
    for n, lab in raw:
        if str(lab) not in index:
            raise GptlabError(f"{path}:{n}: label {lab!r} is not one of the training labels {names}")
        labels.append(index[str(lab)])
    return labels, list(names)


def load_class_rows(path, tokenizer, seq_len: int, names: list[str] | None = None,
                    skip_bad: bool = False) -> ClassRows:
    """Tokenize {"text", "label"} rows, cut to seq_len tokens (the beginning is kept).

    names: the label set of the training split, so a validation split maps names to the same ids; None
    derives it from this file (sorted names, or 0..max for integer labels).
    """
    skip = Skipped() if skip_bad else None
    texts, raw = [], []
    for n, row in read_jsonl(path, skip):
        text, label = row.get("text"), row.get("label")
        problem = None
        if not isinstance(text, str) or not text:
            problem = "field 'text' must be a non-empty string"
        elif isinstance(label, bool) or not isinstance(label, (int, str)):
            problem = f"field 'label' must be an integer or a string, got {label!r}"
        elif isinstance(label, int) and label < 0:
            problem = f"label {label} is negative"
        if problem:
            reject(skip, f"{path}:{n}: {problem}")
            continue
        texts.append(text)
        raw.append((n, label))
    if not texts:
        raise GptlabError(f"{path} gave no usable examples" + (f" ({skip})" if skip and skip.count else ""))
    labels, names = label_ids(path, raw, names)
    ids, truncated = [], 0
    for e in tokenizer.encode_batch(texts):
        if len(e) > seq_len:
            e, truncated = e[:seq_len], truncated + 1
        ids.append(e)
    return ClassRows(list(zip(ids, labels)), list(names), truncated, skip)


# ---------------------------------------------------------------------------------------------------------
# numbered batches


class ExampleBatches:
    """Numbered batches over a list of examples (fine-tuning): an epoch-wise shuffle seeded by (seed, epoch).

    Micro-batch `index` of rank `rank` is made by `collate` from examples
    perm(epoch)[(index * world + rank) * batch_size ...], wrapping into the next epoch, so resume and
    data-parallel splits read exactly what an uninterrupted single-process run would.
    """

    def __init__(self, examples: list[Any], batch_size: int, collate: Callable[[list[Any]], dict[str, torch.Tensor]],
                 seed: int = 0, shuffle: bool = True) -> None:
        if not examples:
            raise GptlabError("no examples to train on")
        self.examples, self.batch_size, self.collate = examples, batch_size, collate
        self.seed, self.shuffle = seed, shuffle
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return max(1, math.ceil(len(self.examples) / self.batch_size))

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.examples))
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)))
        return self._perm[1]

    def batch(self, index: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        n = len(self.examples)
        first = (index * world + rank) * self.batch_size
        picked = []
        for pos in range(first, first + self.batch_size):
            if not self.shuffle and pos >= n:  # evaluation: the last batch may be short, never repeats
                break
            picked.append(self.examples[int(self._order(pos // n)[pos % n])])
        if not picked:
            picked = [self.examples[-1]]
        return self.collate(picked)
