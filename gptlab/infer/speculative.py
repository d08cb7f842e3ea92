"""Speculative decoding with a draft model (Leviathan et al. 2023; Chen et al. 2023): a small model proposes k
tokens one by one, the target scores all of them in one forward pass, and as many as the acceptance rule
allows are kept, plus one token from the target itself. The output follows the target's distribution exactly:

- greedy (temperature 0): a proposal is kept when it is the target's argmax at its place; the first one that
  is not is replaced by the target's argmax. The tokens are those of greedy decoding with the target alone.
- sampling: proposal x drawn from the draft's q is kept with probability min(1, p(x) / q(x)); on the first
  rejection the token is drawn from the residual max(0, p - q) renormalised. Kept or redrawn, each token is
  distributed as p (the target's, after the same temperature / top-k / top-p), whatever the draft.

    from gptlab.infer.speculative import speculative_generate
    out = speculative_generate(target, draft, prompt_ids, max_new_tokens=128, k=4)
    out.token_ids, out.acceptance   # acceptance: the share of proposals kept

Both models must share the tokenizer's ids (the draft's vocabulary may be no larger than the target's). One
sequence at a time, on dense KV caches (gptlab/models/kvcache.py): every round both caches keep what was
accepted and drop the rest (a cache's fill count is set back).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptlab.errors import GptlabError
from gptlab.infer.sampling import top_k_filter, top_p_filter
from gptlab.models.kvcache import DenseCache


@dataclass
class SpeculativeOutput:
    token_ids: list[int]  # the new tokens (a stop id included when one ended the output)
    proposed: int  # draft tokens proposed
    accepted: int  # of them kept
    rounds: int  # target forward passes after the prompt

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def distribution(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """The sampled distribution of `logits` (..., V) after temperature, top-k and top-p (fp32 probabilities)."""
    x = logits.float() / temperature
    if top_k:
        x = top_k_filter(x, top_k)
    if top_p is not None and top_p < 1.0:
        x = top_p_filter(x, top_p)
    return torch.softmax(x, dim=-1)


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, x: int, gen: torch.Generator) -> int | None:
    """The rejection rule for one proposal x ~ q: None when it is kept, else the replacement drawn from
    max(0, p - q) renormalised (p where that is all zero, which happens only when p = q)."""
    u = torch.rand((), generator=gen).item()
    if q[x] > 0 and u < min(1.0, (p[x] / q[x]).item()):
        return None
    residual = (p - q).clamp(min=0)
    total = residual.sum()
    residual = residual / total if total > 0 else p
    return int(torch.multinomial(residual, 1, generator=gen))


@torch.no_grad()
def speculative_generate(target, draft, prompt: list[int], max_new_tokens: int = 64, k: int = 4,
                         temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                         seed: int | None = None, eos_ids: list[int] | tuple[int, ...] = ()) -> SpeculativeOutput:
    """Continue `prompt` with `target`, `draft` proposing `k` tokens per round (see the module docstring)."""
    if not prompt:
        raise GptlabError("speculative decoding needs a prompt of at least one token")
    if k < 1:
        raise GptlabError(f"k (draft tokens per round) must be at least 1, got {k}")
    if draft.config.vocab_size > target.config.vocab_size:
        raise GptlabError(f"the draft's vocabulary ({draft.config.vocab_size}) is larger than the target's "
                          f"({target.config.vocab_size}): they cannot share one tokenizer")
    context = min(target.config.context_length, draft.config.context_length)
    if len(prompt) + max_new_tokens > context:
        raise GptlabError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceed the context both models "
                          f"share ({context})")
    device = target.wte.weight.device
    capacity = len(prompt) + max_new_tokens + k + 1
    tc, dc = (DenseCache.for_model(m, 1, min(capacity, m.config.context_length)) for m in (target, draft))
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    greedy = temperature == 0
    V = draft.config.vocab_size

    def pick(logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        if greedy:
            return int(logits.argmax()), None
        probs = distribution(logits, temperature, top_k, top_p)
        return int(torch.multinomial(probs, 1, generator=gen)), probs

    def ids(tokens: list[int]) -> torch.Tensor:
        return torch.tensor([tokens], dtype=torch.long, device=device)

    # both caches hold everything but the last token emitted; `pending` is what each still has to read
    if len(prompt) > 1:
        target(ids(prompt[:-1]), cache=tc)
        draft(ids(prompt[:-1]), cache=dc)
    out: list[int] = []
    t_pending, d_pending = [prompt[-1]], [prompt[-1]]
    proposed = accepted = rounds = 0
    while len(out) < max_new_tokens:
        n = min(k, max_new_tokens - len(out) - 1)  # the round's last token comes from the target itself
        proposals, qs = [], []
        logits = draft(ids(d_pending), cache=dc)[0, -1, :V] if n else None
        for i in range(n):
            token, q = pick(logits)
            proposals.append(token)
            qs.append(q)
            if i + 1 < n:
                logits = draft(ids([token]), cache=dc)[0, -1, :V]
        base = tc.filled
        scores = target(ids(t_pending + proposals), cache=tc)[0, -len(proposals) - 1:]  # (n + 1, V)
        rounds += 1
        proposed += n
        kept: list[int] = []
        extra = None
        for i, token in enumerate(proposals):
            if greedy:
                best = int(scores[i].argmax())
                if best != token:
                    extra = best
                    break
            else:
                p = distribution(scores[i], temperature, top_k, top_p)
                q = torch.zeros_like(p)
                q[:V] = qs[i]
                extra = accept_or_resample(p, q, token, gen)
                if extra is not None:
                    break
            kept.append(token)
            if token in eos_ids:
                break
        accepted += len(kept)
        if extra is None and not (kept and kept[-1] in eos_ids):
            extra = pick(scores[len(kept)])[0]  # every proposal kept: the target's own next token
        new = kept + ([extra] if extra is not None else [])
        # keep in each cache what it read of the accepted tokens; the last new token is read next round
        tc.filled = base + len(t_pending) + len(kept)
        if n:  # the draft read its pending tokens and every proposal but the last: it keeps the accepted ones
            read = min(len(kept), n - 1)
            dc.filled -= n - 1 - read
            d_pending = kept[read:] + new[-1:]  # an accepted last proposal was never read by the draft
        else:
            d_pending = d_pending + new[-1:]
        t_pending = new[-1:]
        stop = next((j for j, t in enumerate(new) if t in eos_ids), None)
        out.extend(new if stop is None else new[:stop + 1])
        if stop is not None:
            break
    return SpeculativeOutput(out[:max_new_tokens], proposed, accepted, rounds)
