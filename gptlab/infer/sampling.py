"""How each next token is chosen: `Sampling` options (one per request), the logits processors, and
`sample_rows`, which picks the next token of every row of an engine step at once.

Processors run in transformers' order (repetition penalty, no-repeat n-gram, presence / frequency
penalty, temperature, top-k, top-p, min-p), so greedy output matches `transformers.generate`. A sampled row
draws from its own generator (seeded per request), with one uniform draw per token, so a seeded request
samples the same tokens whatever else is in the batch.
"""

from __future__ import annotations


from dataclasses import dataclass, field

import torch

from gptlab.errors import GptlabError
from gptlab.limits import check_fields
from gptlab.infer.structured import Constraint


@dataclass
class Sampling:
    """How each next token is chosen (temperature 0 = greedy)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0  # CTRL paper: divide positive logits (multiply negative) of seen tokens
    no_repeat_ngram_size: int = 0  # ban tokens that would repeat an n-gram already in the sequence
    min_p: float | None = None  # drop tokens less likely than min_p x the likeliest one
    presence_penalty: float = 0.0  # OpenAI's: subtract from the logit of every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtract this x the number of times a token was generated
    stop: list[str] = field(default_factory=list)  # stop strings, excluded from the output
    eos_id: int | list[int] | None = None  # stop a row at these ids (default: the config's / tokenizer's EOS)
    seed: int | None = None
    truncate: bool = False  # drop the oldest prompt tokens when prompt + new tokens exceed the context
    n: int = 1  # samples per prompt (they share the prompt's cached blocks)
    logprobs: int | None = None  # return the chosen token's log-probability and this many alternatives
    thinking_budget: int | None = None  # reasoning tokens before the answer is forced (gptlab/infer/thinking.py)
    constraint: Constraint | None = None  # JSON schema / regex / choice / grammar the output must match (structured.py)

    def __post_init__(self) -> None:
        check_fields(self, ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty",
                            "no_repeat_ngram_size", "min_p", "presence_penalty", "frequency_penalty", "n", "logprobs",
                            "thinking_budget"))
        if any(not isinstance(s, str) or not s for s in self.stop or []):
            raise GptlabError("stop strings must not be empty (an empty one would end every reply at once)")
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise GptlabError(f"constraint must be a gptlab.infer.structured.Constraint, got {type(self.constraint).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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


def min_p_filter(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p (R, 1) times the row's likeliest token's."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


@dataclass
class Row:
    """One row of an engine step, as the sampler sees it."""

    sampling: Sampling
    tokens: list[int]  # prompt + generated so far
    num_prompt: int
    generator: torch.Generator | None = None  # the request's own (seeded) generator; None for greedy rows


@dataclass
class TokenLogprobs:
    logprob: float  # of the chosen token, under the model's distribution (before sampling processors)
    top: list[tuple[int, float]]  # the `logprobs` likeliest tokens and their log-probabilities


def _penalise(logits: torch.Tensor, rows: list[Row]) -> None:
    """Per-row penalties in place: repetition (CTRL), no-repeat n-grams, presence / frequency (OpenAI)."""
    for i, r in enumerate(rows):
        s = r.sampling
        if s.repetition_penalty != 1.0:
            logits[i] = apply_repetition_penalty(logits[i:i + 1], torch.tensor([r.tokens], device=logits.device),
                                                 s.repetition_penalty)[0]
        if s.no_repeat_ngram_size:
            banned = banned_ngram_tokens(r.tokens, s.no_repeat_ngram_size)
            if banned:
                logits[i, banned] = float("-inf")
        out = r.tokens[r.num_prompt:]
        if (s.presence_penalty or s.frequency_penalty) and out:
            counts = torch.bincount(torch.tensor(out, device=logits.device), minlength=logits.shape[-1]).float()
            logits[i] -= s.frequency_penalty * counts + s.presence_penalty * (counts > 0).float()


def _draw(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """Sampled rows: temperature, top-k, top-p, min-p, then one uniform draw from each row's generator."""
    dev = logits.device
    x = logits / torch.tensor([r.sampling.temperature for r in rows], device=dev)[:, None]
    V = x.shape[-1]
    ks = [min(r.sampling.top_k or V, V) for r in rows]
    if min(ks) < V:
        kth = torch.topk(x, max(ks), dim=-1).values.gather(1, torch.tensor(ks, device=dev)[:, None] - 1)
        x = x.masked_fill(x < kth, float("-inf"))
    ps = [r.sampling.top_p if r.sampling.top_p is not None else 1.0 for r in rows]
    if min(ps) < 1.0:
        sorted_x, order = torch.sort(x, descending=False, dim=-1)
        cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - torch.tensor(ps, device=dev))[:, None]
        remove[..., -1] = False
        x = x.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    mins = [r.sampling.min_p or 0.0 for r in rows]
    if max(mins) > 0:
        x = min_p_filter(x, torch.tensor(mins, device=dev)[:, None])
    cdf = x.softmax(dim=-1).cumsum(dim=-1)  # (R, V)
    u = torch.stack([torch.rand((), generator=r.generator, device=dev) for r in rows])[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=V - 1)[:, 0]


def sample_rows(logits: torch.Tensor, rows: list[Row], model_logits: torch.Tensor | None = None
                ) -> tuple[list[int], list[TokenLogprobs | None]]:
    """The next token of each row from its logits (R, V), each by its own Sampling; and its log-probs when
    the row asks for them, from model_logits when given (the logits before a constraint's mask)."""
    logits = logits.float()
    wanted = any(r.sampling.logprobs is not None for r in rows)
    raw = (logits if model_logits is None else model_logits.float()).log_softmax(dim=-1) if wanted else None
    if any(r.sampling.repetition_penalty != 1.0 or r.sampling.no_repeat_ngram_size or r.sampling.presence_penalty
           or r.sampling.frequency_penalty for r in rows):
        _penalise(logits, rows)
    chosen = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    greedy = [i for i, r in enumerate(rows) if r.sampling.greedy]
    drawn = [i for i, r in enumerate(rows) if not r.sampling.greedy]
    if len(greedy) == len(rows):
        chosen = logits.argmax(dim=-1)
    elif greedy:
        chosen[greedy] = logits[greedy].argmax(dim=-1)
    if drawn:
        chosen[drawn] = _draw(logits[drawn], [rows[i] for i in drawn])
    tokens = chosen.tolist()
    info: list[TokenLogprobs | None] = [None] * len(rows)
    for i, r in enumerate(rows):
        n = r.sampling.logprobs
        if n is not None:
            top = raw[i].topk(n) if n else None
            info[i] = TokenLogprobs(float(raw[i, tokens[i]]),
                                    list(zip(top.indices.tolist(), top.values.tolist())) if n else [])
    return tokens, info
