"""Sequence classification: a `score` Linear (no bias) on the hidden state of each row's last non-pad
token, as transformers' *ForSequenceClassification do, so a saved classifier opens there unchanged
(gptlab/formats/hf.py writes and reads it; data rows are read by gptlab/data/examples.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn


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


class TaskClassifier(SequenceClassifier):
    """GPT-1's task heads over rows of several sequences (gptlab/data/gpt1_tasks.py), input (B * group, T):

    one: each sequence's class logits (entailment); sum: the logits of a row's sequences summed (similarity:
    both orders; the head has no bias, so this is the paper's sum of the extract states); choice: a score per
    sequence (a one-output head), the row's choices' scores as its logits.
    A saved checkpoint is the HF *ForSequenceClassification of one sequence; summing or comparing its outputs
    over a row's sequences gives these logits.
    """

    def __init__(self, model: nn.Module, num_labels: int, pad_id: int | None, combine: str, group: int) -> None:
        super().__init__(model, 1 if combine == "choice" else num_labels, pad_id)
        self.combine, self.group = combine, group

    def forward(self, idx: torch.Tensor, with_hidden: bool = False):
        """idx (B * group, T) -> logits (B, num_labels); with_hidden: also the hidden states (B * group, T, C)."""
        h = self.model(idx, return_hidden=True)
        last = h[torch.arange(idx.shape[0], device=idx.device), self.last_token(idx)]
        logits = self.score(last)  # (B * group, out)
        if self.combine == "sum":
            logits = logits.view(-1, self.group, logits.shape[-1]).sum(1)
        elif self.combine == "choice":
            logits = logits.view(-1, self.group)
        return (logits, h) if with_hidden else logits
