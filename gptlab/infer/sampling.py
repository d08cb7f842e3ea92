"""How each next token is chosen: `Sampling` options and the logits processors, each (B, V) -> (B, V).

Processors run in transformers' order (repetition penalty, no-repeat n-gram, temperature, top-k, top-p),
so greedy output and seeded sampling are reproducible and greedy matches `transformers.generate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gptlab.errors import GptlabError


@dataclass
class Sampling:
    """How each next token is chosen (temperature 0 = greedy)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0  # CTRL paper: divide positive logits (multiply negative) of seen tokens
    no_repeat_ngram_size: int = 0  # ban tokens that would repeat an n-gram already in the sequence
    stop: list[str] = field(default_factory=list)  # stop strings, excluded from the output
    eos_id: int | list[int] | None = None  # stop a row at these ids (default: the tokenizer's / config's EOS)
    seed: int | None = None
    truncate: bool = False  # drop the oldest prompt tokens when prompt + new tokens exceed the context

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GptlabError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise GptlabError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise GptlabError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GptlabError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise GptlabError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise GptlabError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")


# ---------------------------------------------------------------------------------------------------------
# logits processors


def apply_repetition_penalty(logits: torch.Tensor, seqs: torch.Tensor, penalty: float) -> torch.Tensor:
    """seqs (B, L) holds every token so far (prompt + generated), -1 where a row has none."""
    counts = torch.zeros_like(logits)
    counts.scatter_add_(1, seqs.clamp(min=0), (seqs >= 0).to(logits.dtype))  # padding (-1) adds 0
    seen = counts > 0
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def banned_ngram_tokens(seq: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in `seq` (transformers' NoRepeatNGram)."""
    if len(seq) + 1 < n:
        return []
    prefix = tuple(seq[len(seq) - n + 1:]) if n > 1 else ()
    return sorted({seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i:i + n - 1]) == prefix})


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability sums to >= p (nucleus sampling), at least one."""
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - p)
    remove[..., -1] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def next_token(logits: torch.Tensor, s: Sampling, history: list[list[int]], gen: torch.Generator | None) -> torch.Tensor:
    """Choose the next token for each row from logits (B, V); history: each row's tokens so far."""
    logits = logits.float()
    if s.repetition_penalty != 1.0:
        width = max(len(h) for h in history)
        seqs = torch.tensor([h + [-1] * (width - len(h)) for h in history], device=logits.device)
        logits = apply_repetition_penalty(logits, seqs, s.repetition_penalty)
    if s.no_repeat_ngram_size:
        for row, h in enumerate(history):
            banned = banned_ngram_tokens(h, s.no_repeat_ngram_size)
            if banned:
                logits[row, banned] = float("-inf")
    if s.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / s.temperature
    if s.top_k is not None:
        logits = top_k_filter(logits, s.top_k)
    if s.top_p is not None and s.top_p < 1.0:
        logits = top_p_filter(logits, s.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)
