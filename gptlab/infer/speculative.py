"""Speculative decoding with a draft model (Leviathan et al. 2023; Chen et al. 2023): a small model proposes k
tokens one by one, the target scores all of them in one forward pass, and as many as the acceptance rule
allows are kept, plus one token from the target itself. The output follows the target's distribution exactly:

- greedy (temperature 0): a proposal is kept when it is the target's argmax at its place; the first one that
  is not is replaced by the target's argmax. The tokens are those of greedy decoding with the target alone.
- sampling: proposal x drawn from the draft's q is kept with probability min(1, p(x) / q(x)); on the first
  rejection the token is drawn from the residual max(0, p - q) renormalised. Kept or redrawn, each token is
  distributed as p (the target's, after the same temperature / top-k / top-p / min-p), whatever the draft.

    from gptlab.infer.speculative import speculative_generate
    out = speculative_generate(target, draft, prompt_ids, max_new_tokens=128, k=4)
    out.token_ids, out.acceptance   # acceptance: the share of proposals kept

Both models must share the tokenizer's ids (the draft's vocabulary may be no larger than the target's).
Two ways to run it:

- `speculative_generate`: one sequence on dense KV caches (gptlab/models/kvcache.py), every round both caches
  keep what was accepted and drop the rest (a cache's fill count is set back). The reference the engine's
  path is tested against.
- `Drafter`: the draft inside the continuously batching engine (`Engine(model, tok, cfg, draft=small)`). The
  draft has its own paged KV pool, indexed by the engine's block tables, and reads every token the target
  reads, so prefix caching and preemption cover both. Each step the decoding sequences whose options the rule
  honours exactly (`speculates`) get k proposals, the draft running batched over them; the target checks each
  sequence's [pending token, proposals] as one segment of the step's one flattened forward, and `accept` keeps
  what the rule keeps. A rejected proposal's keys and values stay in its slots until overwritten; only
  blocks of kept tokens join the prefix cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptlab.errors import GptlabError
from gptlab.infer.paged import PagedCache, Segment
from gptlab.infer.sampling import Sampling, min_p_filter, top_k_filter, top_p_filter
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


def distribution(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                 min_p: float | None = None) -> torch.Tensor:
    """The sampled distribution of `logits` (..., V) after temperature, top-k, top-p and min-p, in the engine
    sampler's order (gptlab/infer/sampling.py), as fp32 probabilities."""
    x = logits.float() / temperature
    if top_k:
        x = top_k_filter(x, top_k)
    if top_p is not None and top_p < 1.0:
        x = top_p_filter(x, top_p)
    if min_p:
        x = min_p_filter(x, torch.tensor(min_p, device=x.device))
    return torch.softmax(x, dim=-1)


def _distribution(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    return distribution(logits, s.temperature, s.top_k, s.top_p, s.min_p)


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, x: int, gen: torch.Generator) -> int | None:
    """The rejection rule for one proposal x ~ q: None when it is kept, else the replacement drawn from
    max(0, p - q) renormalised (p where that is all zero, which happens only when p = q)."""
    u = torch.rand((), generator=gen, device=gen.device).item()
    if q[x] > 0 and u < min(1.0, (p[x] / q[x]).item()):
        return None
    residual = (p - q).clamp(min=0)
    total = residual.sum()
    residual = residual / total if total > 0 else p
    return int(torch.multinomial(residual, 1, generator=gen))


def accept(scores: torch.Tensor, proposals: list[int], probs: torch.Tensor | None, s: Sampling,
           gen: torch.Generator | None) -> tuple[list[int], int]:
    """One round's new tokens: the proposals the rule keeps, then one token of the target's own; and how many
    proposals were kept.

    scores (n + 1, V): the target's logits after the pending token and after each of the n proposals. probs
    (n, Vd): the draft's distributions the proposals were drawn from (None when greedy). Greedy keeps the
    longest prefix equal to the target's argmax; sampling applies `accept_or_resample` to each proposal in turn
    with the request's generator, and draws the last token from the target's distribution when all are kept."""
    if s.greedy:
        best = scores.float().argmax(dim=-1).tolist()  # one transfer for the whole round
        kept = next((i for i, (t, b) in enumerate(zip(proposals, best)) if t != b), len(proposals))
        return proposals[:kept] + [best[kept]], kept
    p = _distribution(scores, s)  # (n + 1, V)
    for i, x in enumerate(proposals):
        q = torch.zeros_like(p[i])
        q[:probs.shape[-1]] = probs[i]
        extra = accept_or_resample(p[i], q, x, gen)
        if extra is not None:
            return proposals[:i] + [extra], i
    return proposals + [int(torch.multinomial(p[-1], 1, generator=gen))], len(proposals)


def speculates(s: Sampling, thinking_tags: bool = True) -> bool:
    """Whether the acceptance rule gives a request exactly what plain decoding gives it (greedy: the tokens;
    sampling: their distribution). Constraints, log-probs, the penalties, no-repeat n-grams and thinking
    budgets act on each token as it is chosen: such requests decode one token per step, beside the others.
    thinking_tags: whether the tokenizer has <think> tags (without them a budget does nothing)."""
    return (s.constraint is None and s.logprobs is None and s.repetition_penalty == 1.0 and not s.presence_penalty
            and not s.frequency_penalty and not s.no_repeat_ngram_size
            and (s.thinking_budget is None or not thinking_tags))


def check_draft(target_config, draft_config, tokenizer=None, draft_tokenizer=None, name: str = "the draft") -> None:
    """Refuse a draft that cannot propose for this target: one with another tokenizer or a larger vocabulary
    (its ids would not be the target's), or a shorter context (it could not read the longer requests)."""
    if draft_config.vocab_size > target_config.vocab_size:
        raise GptlabError(f"{name}'s vocabulary ({draft_config.vocab_size}) is larger than the model's "
                          f"({target_config.vocab_size}): they cannot share one tokenizer")
    if draft_config.context_length < target_config.context_length:
        raise GptlabError(f"{name}'s context ({draft_config.context_length}) is shorter than the model's "
                          f"({target_config.context_length}): it could not read the longer requests")
    if tokenizer is not None and draft_tokenizer is not None:
        probe = "The with statement: 中文, x += 1\n"  # the same vocabulary with other merges splits it otherwise
        vocab = [t.backend.get_vocab(with_added_tokens=True) for t in (tokenizer, draft_tokenizer)]
        if vocab[0] != vocab[1] or tokenizer.encode(probe) != draft_tokenizer.encode(probe):
            raise GptlabError(f"{name} does not share the model's tokenizer (its tokens or merges differ)")


def load_draft(path: str, target, tokenizer, dtype=None, device=None, quantize: str | None = None):
    """A draft model dir (or hub id) for `target`: its config and tokenizer checked against the target's
    (check_draft) before its weights load; `quantize` as the target's."""
    from gptlab.formats import hf

    check_draft_dir(path, target.config, tokenizer)
    return hf.load(path, dtype=dtype, device=device, quantize=quantize)


def check_draft_dir(path: str, target_config, tokenizer) -> None:
    """check_draft on a draft dir's config.json and tokenizer, without loading its weights."""
    from gptlab.formats import hf
    from gptlab.tokenizer import load_tokenizer

    config = hf.read_config(hf.resolve(path, hf.HUB_CONFIG_PATTERNS))
    check_draft(target_config, config, name=f"the draft {path}")  # from config.json alone, then the tokenizers
    check_draft(target_config, config, tokenizer, load_tokenizer(path), name=f"the draft {path}")


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
    gen = torch.Generator(device=device).manual_seed(seed if seed is not None else torch.seed())
    rule = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k or None, top_p=top_p)
    V = draft.config.vocab_size

    def pick(logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        if rule.greedy:
            return int(logits.argmax()), None
        probs = _distribution(logits, rule)
        return int(torch.multinomial(probs, 1, generator=gen)), probs

    def ids(tokens: list[int], vocab: int | None = None) -> torch.Tensor:
        x = torch.tensor([tokens], dtype=torch.long, device=device)
        return x if vocab is None else x.clamp_(max=vocab - 1)  # the draft reads a target-only id as its last

    # both caches hold everything but the last token emitted; `pending` is what each still has to read
    if len(prompt) > 1:
        target(ids(prompt[:-1]), cache=tc)
        draft(ids(prompt[:-1], V), cache=dc)
    out: list[int] = []
    t_pending, d_pending = [prompt[-1]], [prompt[-1]]
    proposed = accepted = rounds = 0
    while len(out) < max_new_tokens:
        n = min(k, max_new_tokens - len(out) - 1)  # the round's last token comes from the target itself
        proposals, qs = [], []
        logits = draft(ids(d_pending, V), cache=dc)[0, -1, :V] if n else None
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
        new, kept = accept(scores, proposals, torch.stack(qs) if qs and not rule.greedy else None, rule, gen)
        accepted += kept
        # keep in each cache what it read of the accepted tokens; the last new token is read next round
        tc.filled = base + len(t_pending) + kept
        if n:  # the draft read its pending tokens and every proposal but the last: it keeps the accepted ones
            read = min(kept, n - 1)
            dc.filled -= n - 1 - read
            d_pending = proposals[read:kept] + new[-1:]  # an accepted last proposal was never read by the draft
        else:
            d_pending = d_pending + new[-1:]
        t_pending = new[-1:]
        stop = next((j for j, t in enumerate(new) if t in eos_ids), None)
        out.extend(new if stop is None else new[:stop + 1])
        if stop is not None:
            break
    return SpeculativeOutput(out[:max_new_tokens], proposed, accepted, rounds)


# ---------------------------------------------------------------------------------------------------------
# in the engine


@dataclass
class Draft:
    """One sequence's proposals this step."""

    tokens: list[int]
    probs: torch.Tensor | None  # (n, Vd): the draft's distributions they were drawn from (None: greedy)


class Drafter:
    """The engine's draft model: its paged KV pool (the engine's block count and size, indexed by the same block
    tables), its proposals each step, and the acceptance counters (vLLM's spec_decode_* metrics).

    A sequence's `num_drafted` says how far the draft has read it; the draft reads every token the target
    computes for the base model (a LoRA adapter's sequences never share blocks with it), so a block the prefix
    cache hands out holds the draft's keys too. The one token it may lag behind, a last proposal that was
    kept (the draft proposed it but never read it), it reads first in the next step. Sequences' `data` is the
    engine's per-sequence state: its sampling, generator and adapter.
    """

    def __init__(self, draft, k: int, num_blocks: int, block_size: int) -> None:
        self.model = draft.eval()
        w = draft.wte.weight
        self.device, self.vocab = w.device, draft.config.vocab_size
        self.cache = PagedCache(draft.config, num_blocks, block_size, w.dtype, w.device)
        self.drafts = self.draft_tokens = self.accepted = 0  # rounds, proposals, proposals kept
        self.accepted_per_pos = [0] * k  # rounds whose i-th proposal was kept

    @staticmethod
    def bytes_per_block(draft, block_size: int) -> int:
        return PagedCache.bytes_per_block(draft.config, block_size, draft.wte.weight.dtype)

    def _forward(self, ids: list[int], segments: list[Segment], rows: list[int]) -> torch.Tensor | None:
        positions = self.cache.prepare(segments)
        x = torch.tensor([ids], device=self.device).clamp_(max=self.vocab - 1)  # (1, N); an id of the target's
        # padded vocabulary past the draft's reads as the draft's last: it can only cost acceptance
        hidden = self.model(x, positions=positions, cache=self.cache, return_hidden=True)  # (1, N, C)
        if not rows:
            return None
        return self.model.lm_head(hidden[0, torch.tensor(rows, device=self.device)])[:, :self.vocab]  # (R, Vd)

    def propose(self, seqs: list, counts: list[int], lookahead: list[int]) -> list[Draft | None]:
        """Read this step's tokens into the draft's pool, and propose lookahead[i] tokens after the pending token
        of each sequence given slots for them (a scheduler Step's lists). Returns a Draft or None per sequence."""
        ids, segments, rows, start = [], [], [], 0
        for i, (seq, n) in enumerate(zip(seqs, counts)):
            if seq.data.adapter is not None:
                continue
            begin, end = min(seq.num_drafted, seq.num_computed), seq.num_computed + n
            ids += seq.tokens[begin:end]
            segments.append(Segment(start, end - begin, begin, seq.block_table))
            seq.num_drafted = end
            start += end - begin
            if lookahead[i]:
                rows.append(start - 1)
        if not ids:
            return [None] * len(seqs)
        logits = self._forward(ids, segments, rows)  # the first proposals' logits
        spec = [i for i, n in enumerate(lookahead) if n]
        drafts = {i: Draft([], None if seqs[i].data.sampling.greedy else []) for i in spec}
        for j in range(max(lookahead)):
            live = [i for i in spec if lookahead[i] > j]
            if j:  # the last proposals in, the next ones out: one token per sequence, batched
                logits = self._forward([drafts[i].tokens[-1] for i in live],
                                       [Segment(r, 1, seqs[i].num_drafted, seqs[i].block_table)
                                        for r, i in enumerate(live)], list(range(len(live))))
                for i in live:
                    seqs[i].num_drafted += 1
            self._pick(logits, [seqs[i].data for i in live], [drafts[i] for i in live])
        for d in drafts.values():
            if d.probs is not None:
                d.probs = torch.stack(d.probs)
        return [drafts.get(i) for i in range(len(seqs))]

    @staticmethod
    def _pick(logits: torch.Tensor, states: list, drafts: list[Draft]) -> None:
        """Each row's next proposal: the draft's argmax (greedy), else a draw from the draft's distribution
        under the request's options, with the request's own generator."""
        best = logits.argmax(dim=-1).tolist()
        for row, st, d, b in zip(logits, states, drafts, best):
            if st.sampling.greedy:
                d.tokens.append(b)
            else:
                q = _distribution(row, st.sampling)
                d.tokens.append(int(torch.multinomial(q, 1, generator=st.generator)))
                d.probs.append(q)

    def accept(self, scores: torch.Tensor, d: Draft, st) -> tuple[list[int], int]:
        """accept() for one sequence's round, counted."""
        new, kept = accept(scores, d.tokens, d.probs, st.sampling, st.generator)
        self.drafts += 1
        self.draft_tokens += len(d.tokens)
        self.accepted += kept
        for i in range(kept):
            self.accepted_per_pos[i] += 1
        return new, kept

    def stats(self) -> dict:
        return {"spec_drafts": self.drafts, "spec_draft_tokens": self.draft_tokens,
                "spec_accepted_tokens": self.accepted, "spec_accepted_per_pos": list(self.accepted_per_pos)}
