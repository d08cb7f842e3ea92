"""Sequence classification: a `score` Linear (no bias) on the hidden state of each row's last non-pad
token, as transformers' *ForSequenceClassification do, so a saved classifier opens there unchanged.

Data rows are {"text": ..., "label": ...}; labels are class ids (ints) or names (strings, ids by sorted name).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.errors import GptlabError
from gptlab.sft import Skipped, read_jsonl

# transformers' sequence-classification class per model_type (written to config.json "architectures")
ARCHITECTURES = {
    "gpt2": "GPT2ForSequenceClassification", "openai-gpt": "OpenAIGPTForSequenceClassification",
    "gpt_neo": "GPTNeoForSequenceClassification", "gptj": "GPTJForSequenceClassification",
    "gpt_neox": "GPTNeoXForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification", "qwen2_moe": "Qwen2MoeForSequenceClassification",
    "qwen3_moe": "Qwen3MoeForSequenceClassification",
}


class SequenceClassifier(nn.Module):
    """A gptlab GPT (`self.model`) with a classification head (`self.score`)."""

    def __init__(self, model: nn.Module, num_labels: int, pad_id: int | None) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        w = model.wte.weight
        self.score = nn.Linear(model.config.n_embd, num_labels, bias=False, device=w.device, dtype=w.dtype)
        nn.init.normal_(self.score.weight, std=model.config.init_std)  # transformers: initializer_range
        self.pad_id = pad_id

    @property
    def num_labels(self) -> int:
        return self.score.out_features

    def last_token(self, idx: torch.Tensor) -> torch.Tensor:
        """(B,) index of each row's rightmost non-pad token (transformers' rule, left or right padding)."""
        if self.pad_id is None:
            return torch.full((idx.shape[0],), idx.shape[1] - 1, device=idx.device)
        positions = torch.arange(idx.shape[1], device=idx.device)
        return (positions * (idx != self.pad_id)).argmax(-1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) -> class logits (B, num_labels)."""
        h = self.model(idx, return_hidden=True)  # (B, T, C)
        last = h[torch.arange(idx.shape[0], device=idx.device), self.last_token(idx)]  # (B, C)
        return self.score(last)

    def loss(self, idx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(idx).float(), labels)


# ---------------------------------------------------------------------------------------------------------
# data


@dataclass
class ClassRows:
    examples: list[tuple[list[int], int]]  # (token ids, class id)
    names: list[str]  # class id -> name
    truncated: int = 0  # texts cut to max_len tokens
    skipped: Skipped | None = None

    def summary(self) -> str:
        notes = [f"{len(self.examples)} examples, {len(self.names)} classes"]
        if self.truncated:
            notes.append(f"{self.truncated} cut to the context length")
        if self.skipped and self.skipped.count:
            notes.append(str(self.skipped))
        return ", ".join(notes)


def load_class_rows(path, tokenizer, max_len: int, names: list[str] | None = None,
                    skip_bad: bool = False) -> ClassRows:
    """Tokenize {"text", "label"} rows, cut to max_len tokens (the beginning is kept).

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
            if skip is None:
                raise GptlabError(f"{path}:{n}: {problem}")
            skip.add(f"{path}:{n}: {problem}")
            continue
        texts.append(text)
        raw.append((n, label))
    if not texts:
        raise GptlabError(f"{path} gave no usable examples" + (f" ({skip})" if skip and skip.count else ""))
    if names is None:
        if all(isinstance(lab, int) for _, lab in raw):
            names = [str(i) for i in range(max(lab for _, lab in raw) + 1)]
        elif all(isinstance(lab, str) for _, lab in raw):
            names = sorted({lab for _, lab in raw})
        else:
            raise GptlabError(f"{path}: labels mix integers and strings; use one kind")
        if len(names) < 2:
            raise GptlabError(f"{path}: classification needs at least two classes, found {names}")
    index = {name: i for i, name in enumerate(names)}
    labels = []
    for n, lab in raw:
        key = str(lab)
        if key not in index:
            raise GptlabError(f"{path}:{n}: label {lab!r} is not one of the training labels {names}")
        labels.append(index[key])
    ids, truncated = [], 0
    for e in tokenizer.encode_batch(texts):
        if len(e) > max_len:
            e, truncated = e[:max_len], truncated + 1
        ids.append(e)
    return ClassRows(list(zip(ids, labels)), list(names), truncated, skip)


# ---------------------------------------------------------------------------------------------------------
# metrics


def confusion(preds: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(k, k) counts: row = true class, column = predicted class."""
    conf = torch.zeros(k, k, dtype=torch.long, device=labels.device)
    labels, preds = labels.flatten().long(), preds.flatten().long()
    return conf.index_put_((labels, preds), torch.ones_like(labels), accumulate=True)


def metrics_from_confusion(conf: torch.Tensor, names: list[str]) -> dict[str, float]:
    """Accuracy, per-class precision / recall / F1 and their macro average. A class never predicted has
    precision 0 and one never present recall 0 (scikit-learn's zero_division=0)."""
    conf = conf.double().cpu()
    tp = conf.diag()
    predicted, actual = conf.sum(0), conf.sum(1)
    out = {"accuracy": (tp.sum() / conf.sum().clamp(min=1)).item()}
    f1s = []
    for c, name in enumerate(names):
        p = (tp[c] / predicted[c]).item() if predicted[c] else 0.0
        r = (tp[c] / actual[c]).item() if actual[c] else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        out.update({f"precision/{name}": p, f"recall/{name}": r, f"f1/{name}": f1})
        f1s.append(f1)
    out["macro_f1"] = sum(f1s) / len(f1s)
    return out


def metrics(preds: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict[str, float]:
    """Classification metrics of predicted vs true class ids."""
    return metrics_from_confusion(confusion(preds, labels, len(names)), names)


# ---------------------------------------------------------------------------------------------------------
# save and load


def hf_extras(clf: SequenceClassifier, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """The head's tensor and config.json fields transformers' AutoModelForSequenceClassification reads."""
    mt = clf.config.model_type
    cfg = {
        "architectures": [ARCHITECTURES[mt]],
        "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
        "pad_token_id": clf.pad_id,
        "problem_type": "single_label_classification",
    }
    return {"score.weight": clf.score.weight.detach()}, cfg


def save_classifier(clf: SequenceClassifier, path: str | os.PathLike, names: list[str], tokenizer=None) -> Path:
    from gptlab.hf import save

    tensors, cfg = hf_extras(clf, names)
    return save(clf.model, path, tokenizer=tokenizer, extra_tensors=tensors, extra_config=cfg)


def load_classifier(path: str | os.PathLike, dtype=None, device=None) -> tuple[SequenceClassifier, list[str]]:
    """A classifier saved by `save_classifier`, or by transformers' *ForSequenceClassification (which
    stores no LM head: ours is then zero, as a classifier never reads it). Safetensors only."""
    from gptlab.hf import load_with_extras

    path = Path(path)
    model, found = load_with_extras(path, dtype, device, extras=("score.weight",), head_optional=True)
    score = found["score.weight"]
    cfg = json.loads((path / "config.json").read_text())
    id2label = cfg.get("id2label") or {str(i): str(i) for i in range(score.shape[0])}
    names = [id2label[str(i)] for i in range(score.shape[0])]
    clf = SequenceClassifier(model, score.shape[0], cfg.get("pad_token_id"))
    with torch.no_grad():
        clf.score.weight.copy_(score)
    return clf.eval(), names
