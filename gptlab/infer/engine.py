"""The inference engine: continuous batching over a paged, prefix-cached KV cache (in the spirit of
nano-vllm and vLLM's `LLM`).

    from gptlab.infer.engine import Engine, EngineConfig
    engine = Engine(model, tokenizer, EngineConfig(max_batch=32, kv_cache_memory="1GiB"))
    outs = engine.generate(["The with statement", "A class"], Sampling(max_new_tokens=50, temperature=0.8, seed=1))
    print(outs[0].outputs[0].text)

    rid = engine.add_request("Hello", Sampling(max_new_tokens=20))   # the step interface (the server's)
    while engine.has_unfinished():
        for delta in engine.step(): print(delta.text, end="")

Every step the scheduler (scheduler.py) picks which sequences run: running ones get their next token,
waiting ones join while the token budget, the batch limit and free KV blocks allow (long prompts in chunks);
finished ones leave. All their new tokens run as one flattened forward pass over the paged cache (paged.py),
then each sequence that has computed all its tokens samples its next one by its own Sampling (sampling.py).
Requests join and leave at every step; a request's greedy output does not depend on what else is in the
batch, and a seeded request samples from its own generator.

With a draft model (`Engine(model, tok, cfg, draft=small)`: speculative decoding, gptlab/infer/speculative.py),
each decoding sequence whose options allow it gets `draft_tokens` proposals from the draft, and the target
checks them as one multi-token segment of the same forward pass: greedy output stays token for token what it
is without the draft, sampled output keeps the target's distribution.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import torch

from gptlab.errors import GptlabError
from gptlab.limits import check_fields
from gptlab.infer.paged import PagedCache, Segment
from gptlab.infer.sampling import Row, Sampling, TokenLogprobs, sample_rows
from gptlab.infer.scheduler import BlockManager, QueueFull, Scheduler, Sequence, Status
from gptlab.infer.speculative import Drafter, check_draft, speculates
from gptlab.infer.structured import Grammars
from gptlab.infer.text import TextRow, fit_prompt, stop_ids
from gptlab.infer.thinking import ThinkState, opened_by, thinking_tags
from gptlab.models.lora import adapter_names, lora_routing

__all__ = ["Engine", "EngineConfig", "RequestOutput", "CompletionOutput", "Delta", "QueueFull", "parse_size"]

_SIZES = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tb": 10**12,
          "tib": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from 1073741824, "1GiB", "512MB", "2gb"."""
    if isinstance(size, int):
        n = size
    else:
        text = str(size).strip().lower().replace(" ", "")
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(number):]
        try:
            n = int(float(number) * _SIZES[unit])
        except (ValueError, KeyError):
            raise GptlabError(f"size {size!r} is not a number of bytes with an optional unit (e.g. 2GiB, 512MB)") from None
    if n <= 0:
        raise GptlabError(f"size {size!r} must be positive")
    return n


@dataclass
class EngineConfig:
    max_batch: int = 32  # sequences running at once
    max_batched_tokens: int = 512  # tokens per forward pass (prompt chunks + one per decoding sequence)
    block_size: int = 16  # tokens per KV-cache block
    kv_cache_memory: int | str | None = None  # KV pool bytes ("2GiB"); None: max_batch full contexts, <= 2 GiB
    num_blocks: int | None = None  # the KV pool in blocks (overrides kv_cache_memory)
    max_waiting: int = 1024  # requests queued beyond the running batch; more are refused (QueueFull)
    draft_tokens: int = 4  # with a draft model: tokens it proposes per step for each decoding sequence

    def __post_init__(self) -> None:
        check_fields(self, ("max_batch", "max_batched_tokens", "block_size", "max_waiting", "draft_tokens"))


@dataclass
class CompletionOutput:
    index: int  # which of the request's n samples
    token_ids: list[int] = field(default_factory=list)  # generated (a stop id excluded)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "abort"
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_tokens: int = 0  # generated tokens, a stop id included (usage)

    def sampled_ids(self, eos_id: int | None) -> list[int]:
        """What was sampled, as training needs it: token_ids plus the stop id when the sample ended on one."""
        stopped = self.num_tokens > len(self.token_ids) and eos_id is not None
        return self.token_ids + ([eos_id] if stopped else [])


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


@dataclass
class Delta:
    """What one step added to one sample of a request (the server streams these)."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs]
    finish_reason: str | None = None
    generated: int = 0  # tokens this step generated: token_ids, plus a stop id (usage counts it)
    cached: int = 0  # prompt tokens this sample took from the prefix cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class _State:
    """The engine's per-sequence data (Sequence.data)."""

    request_id: str
    index: int
    sampling: Sampling
    eos: set[int]
    text: TextRow | None
    generator: torch.Generator | None
    think: ThinkState
    out: CompletionOutput
    max_len: int  # prompt + max_new_tokens
    matcher: Any = None  # the llguidance matcher of a constrained sample (structured.py)
    masked: bool = False  # this step's token was sampled under the constraint (not inside a reasoning block)
    adapter: str | None = None  # the named LoRA adapter its rows run through (None: the base model)
    speculate: bool = False  # the draft proposes its tokens (speculative.speculates: options the rule honours)


_request_ids = itertools.count()


class Engine:
    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None, draft=None) -> None:
        """draft: a small model of the same tokenizer for speculative decoding (its KV pool shares the memory)."""
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = cfg = config or EngineConfig()
        c = model.config
        w = model.wte.weight
        self.device, self.dtype = w.device, w.dtype
        per_block = PagedCache.bytes_per_block(c, cfg.block_size, w.dtype)
        if draft is not None:
            check_draft(c, draft.config)
            per_block += Drafter.bytes_per_block(draft, cfg.block_size)
        if cfg.num_blocks is not None:
            num_blocks = cfg.num_blocks
        elif cfg.kv_cache_memory is not None:
            num_blocks = parse_size(cfg.kv_cache_memory) // per_block
            if num_blocks < 1:
                raise GptlabError(f"kv_cache_memory {cfg.kv_cache_memory} holds no block of {cfg.block_size} tokens "
                                  f"({per_block:,} bytes for this model)")
        else:
            full = cfg.max_batch * -(-c.context_length // cfg.block_size)
            num_blocks = max(1, min(full, (2 << 30) // per_block))
        self.blocks = BlockManager(num_blocks, cfg.block_size)
        self.cache = PagedCache(c, num_blocks, cfg.block_size, w.dtype, w.device)
        self.drafter = Drafter(draft, cfg.draft_tokens, num_blocks, cfg.block_size) if draft is not None else None
        self.scheduler = Scheduler(self.blocks, cfg.max_batch, cfg.max_batched_tokens, cfg.max_waiting,
                                   lookahead=self._lookahead if draft is not None else None)
        self.tags = thinking_tags(tokenizer)
        self.requests: dict[str, list[Sequence]] = {}
        self._grammars: Grammars | None = None
        self.generated_tokens = 0
        self.prompt_tokens = 0

    @property
    def grammars(self) -> Grammars:
        """Constrained decoding's tokenizer and masks, built at the first constrained request (or by a server
        at start-up: about a second for a 150k-token vocabulary)."""
        if self._grammars is None:
            c = self.model.config
            self._grammars = Grammars(self.tokenizer, c.vocab_size, stop_ids(c, None, self.tokenizer))
        return self._grammars

    # ---- requests ----
    def encode(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise GptlabError("a text prompt needs a tokenizer; pass token ids, or give the engine one")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def add_request(self, prompt: str | Seq[int], sampling: Sampling | None = None,
                    request_id: str | None = None, adapter: str | None = None) -> str:
        """Queue a request (n samples of one prompt); returns its id. Raises QueueFull when the queue is.

        adapter: a named LoRA adapter of the model (gptlab.formats.peft.load_adapter(model, dir, name=...)):
        this request's rows run through it, beside rows of the base and of other adapters in the same steps."""
        s = sampling or Sampling()
        if adapter is not None and adapter not in adapter_names(self.model):
            known = ", ".join(adapter_names(self.model)) or "none loaded"
            raise GptlabError(f"no LoRA adapter named {adapter!r} (adapters: {known})")
        rid = request_id if request_id is not None else f"req-{next(_request_ids)}"
        if rid in self.requests:
            raise GptlabError(f"request id {rid!r} is already in use")
        c = self.model.config
        eos = stop_ids(c, s.eos_id, self.tokenizer)
        start = c.bos_token_id if c.bos_token_id is not None else min(eos, default=None)
        ids = fit_prompt(self.encode(prompt), s.max_new_tokens, c.context_length, s.truncate, start)
        if ids and not 0 <= min(ids) <= max(ids) < c.vocab_size:
            bad = next(t for t in ids if not 0 <= t < c.vocab_size)
            raise GptlabError(f"token id {bad} is outside the model's vocabulary of {c.vocab_size}"
                              + (f" (the tokenizer has {self.tokenizer.vocab_size} tokens: it does not belong to "
                                 f"this model)" if self.tokenizer is not None and self.tokenizer.vocab_size >
                                 c.vocab_size else ""))
        if len(self.scheduler.waiting) + s.n > self.config.max_waiting:
            raise QueueFull(f"the waiting queue is full ({self.config.max_waiting} requests)")
        if self.blocks.blocks_for(len(ids) + s.max_new_tokens) > self.blocks.num_blocks:
            raise GptlabError(f"prompt + max_new_tokens = {len(ids) + s.max_new_tokens} tokens does not fit the KV "
                              f"cache ({self.blocks.num_blocks} blocks of {self.config.block_size} tokens)")
        grammar = self.grammars.compile(s.constraint) if s.constraint is not None else None
        seqs = []
        for i in range(s.n):
            gen = None
            if not s.greedy:
                seed = s.seed + i if s.seed is not None else int(torch.randint(0, 2**62, ()))
                gen = torch.Generator(device=self.device).manual_seed(seed)
            state = _State(rid, i, s, eos, TextRow(self.tokenizer, s.stop) if self.tokenizer is not None else None,
                           gen, ThinkState(self.tags, s.thinking_budget, ids), CompletionOutput(i),
                           len(ids) + s.max_new_tokens)
            if grammar is not None:
                state.matcher = self.grammars.matcher(s.constraint)
            state.adapter = adapter
            state.speculate = self.drafter is not None and adapter is None and speculates(s, self.tags is not None)
            seq = Sequence(list(ids), len(ids), state, leader=seqs[0] if seqs else None,
                           cache_salt=hash(("lora", adapter)) if adapter is not None else 0)
            self.scheduler.add(seq)
            seqs.append(seq)
        self.requests[rid] = seqs
        return rid

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its cache blocks (unknown or finished ids are ignored)."""
        for seq in self.requests.pop(request_id, []):
            if seq.status is not Status.FINISHED:
                seq.data.out.finish_reason = seq.data.out.finish_reason or "abort"
                self.scheduler.remove(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def output(self, request_id: str) -> RequestOutput:
        seqs = self.requests[request_id]
        return RequestOutput(request_id, seqs[0].tokens[:seqs[0].num_prompt], [q.data.out for q in seqs],
                             seqs[0].num_cached)

    def opened_thinking(self, prompt_ids: list[int]) -> bool:
        """Whether this prompt leaves a <think> block open for the model (the reasoning starts at once)."""
        return opened_by(prompt_ids, self.tags)

    # ---- one step ----
    @torch.inference_mode()
    def step(self) -> list[Delta]:
        plan = self.scheduler.schedule()
        if not plan.seqs:
            return []
        drafts = [None] * len(plan.seqs) if self.drafter is None else \
            self.drafter.propose(plan.seqs, plan.counts, plan.lookahead)
        ids, segments, start = [], [], 0
        routes: dict[str, list[int]] = {}  # adapter -> its rows of the flattened batch
        for seq, n, d in zip(plan.seqs, plan.counts, drafts):
            new = seq.tokens[seq.num_computed:seq.num_computed + n] + (d.tokens if d is not None else [])
            ids += new
            segments.append(Segment(start, len(new), seq.num_computed, seq.block_table))
            if seq.data.adapter is not None:
                routes.setdefault(seq.data.adapter, []).extend(range(start, start + len(new)))
            start += len(new)
        positions = self.cache.prepare(segments)
        with lora_routing({a: torch.tensor(r, device=self.device) for a, r in routes.items()}):
            hidden = self.model(torch.tensor([ids], device=self.device), positions=positions, cache=self.cache,
                                return_hidden=True)  # (1, N, C)
        sampling, last, verify = [], [], []
        for seq, n, seg, d in zip(plan.seqs, plan.counts, segments, drafts):
            if seq.num_computed < seq.num_prompt:
                self.prompt_tokens += min(n, seq.num_prompt - seq.num_computed)
            if d is not None:  # what it computed is known once the target has checked the proposals
                verify.append((seq, seg, d))
                continue
            seq.num_computed += n
            self.blocks.computed(seq)
            if seq.pending == 0:  # all its tokens have keys and values: it samples the next one
                sampling.append(seq)
                last.append(seg.start + n - 1)
        # one pass through the head for every row that needs logits: it reads the vocabulary-sized weights once
        checked = [r for _, seg, _ in verify for r in range(seg.start, seg.start + seg.length)]
        if not checked and not last:
            return []
        logits = self.model.lm_head(hidden[0, torch.tensor(checked + last, device=self.device)])  # (rows, V)
        deltas = self._verify(logits[:len(checked)], verify) if verify else []
        return deltas + (self._sample(logits[len(checked):], sampling) if sampling else [])

    def _lookahead(self, seq: Sequence) -> int:
        """Proposals a decoding sequence takes this step (the scheduler's question): k, fewer near its max_tokens
        (a step's last token is the target's own), none for requests the rule cannot honour exactly."""
        return min(self.config.draft_tokens, seq.data.max_len - len(seq) - 1) if seq.data.speculate else 0

    def _verify(self, logits: torch.Tensor, verify: list) -> list[Delta]:
        """The target's verdict on each sequence's [pending token, proposals] (logits: their rows, in order): the
        kept proposals and one token of its own, cut where plain decoding would stop (EOS, a stop string,
        max_tokens, the context)."""
        deltas, at = [], 0
        for seq, seg, d in verify:
            new, kept = self.drafter.accept(logits[at:at + seg.length], d, seq.data)
            at += seg.length
            # keys and values stand for the pending token and the kept proposals; the rest get overwritten
            deltas.append(self._advance(seq, new, None, computed=seg.context + 1 + kept))
        return deltas

    def _sample(self, logits: torch.Tensor, sampling: list[Sequence]) -> list[Delta]:
        """The next token of each sequence (logits: their last rows, in order)."""
        masked = []
        for i, q in enumerate(sampling):
            q.data.masked = q.data.matcher is not None and not q.data.think.inside  # reasoning runs free
            if q.data.masked:
                masked.append(i)
        model_logits = None
        if masked:
            if any(sampling[i].data.sampling.logprobs is not None for i in masked):
                model_logits = logits.clone()  # log-probs are the model's, not the mask's
            self.grammars.mask(logits, masked, [sampling[i].data.matcher for i in masked],
                               [sampling[i].data.eos for i in masked])
        rows = [Row(q.data.sampling, q.tokens, q.num_prompt, q.data.generator) for q in sampling]
        tokens, logprobs = sample_rows(logits, rows, model_logits)
        return [self._advance(seq, [tok], lp) for seq, tok, lp in zip(sampling, tokens, logprobs)]

    def _advance(self, seq: Sequence, tokens: list[int], logprobs: TokenLogprobs | None,
                 computed: int | None = None) -> Delta:
        """Append a step's tokens (one sampled token, or a verified run) one by one until one ends the sequence.
        computed: how many of its tokens now have keys and values (a verified run; else unchanged)."""
        st, out = seq.data, seq.data.out
        new_ids, new_lps, text = [], [], []
        before = out.num_tokens
        finish = None
        for token in tokens:
            self.generated_tokens += 1
            out.num_tokens += 1
            if token in st.eos:
                finish = "stop"
                break
            complete = st.masked and self.grammars.advance(st.matcher, token)
            seq.tokens.append(token)
            forced = []
            st.think.on_token(token)
            if st.think.due():
                forced = st.think.force()[: st.max_len - len(seq.tokens)]  # within max_tokens
                seq.tokens += forced
                out.num_tokens += len(forced)
                self.generated_tokens += len(forced)
            for t in [token, *forced]:
                new_ids.append(t)
                if st.text is not None:
                    text.append(st.text.add(t))
            if logprobs is not None:
                new_lps.append(logprobs)
            if complete or (st.text is not None and st.text.finished):
                finish = "stop"
            elif len(seq.tokens) >= st.max_len or len(seq.tokens) >= self.model.config.context_length:
                finish = "length"
            if finish is not None:
                break
        if computed is not None:
            seq.num_computed = min(computed, len(seq.tokens))
            self.blocks.computed(seq, seq.num_drafted)  # full blocks of kept tokens both models have read
        if finish is not None and st.text is not None:
            text.append(st.text.rest())
        out.token_ids += new_ids
        out.logprobs += new_lps
        piece = "".join(text)
        out.text += piece
        if finish is not None:
            out.finish_reason = finish
            self.scheduler.remove(seq)
        return Delta(st.request_id, st.index, new_ids, piece, new_lps, finish, out.num_tokens - before, seq.num_cached)

    # ---- whole requests ----
    def generate(self, prompts: str | Seq[int] | list, sampling: Sampling | list[Sampling] | None = None,
                 progress: bool = False) -> list[RequestOutput]:
        """Run prompts (texts or token-id lists) to the end as one continuously batched workload."""
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        samplings = sampling if isinstance(sampling, list) else [sampling or Sampling()] * len(prompts)
        if len(samplings) != len(prompts):
            raise GptlabError(f"{len(samplings)} Sampling objects for {len(prompts)} prompts")
        rids = [self.add_request(p, s) for p, s in zip(prompts, samplings)]
        from tqdm.auto import tqdm

        with tqdm(total=len(rids), desc="generate", disable=not progress, leave=False) as bar:
            done = 0
            while self.has_unfinished():
                self.step()
                now = sum(self.output(r).finished for r in rids)
                bar.update(now - done)
                done = now
        outs = [self.output(r) for r in rids]
        for r in rids:
            self.requests.pop(r, None)
        return outs

    def stream(self, prompt: str | Seq[int], sampling: Sampling | None = None) -> Iterator[Delta]:
        """One request's deltas as they are made (this engine runs nothing else meanwhile)."""
        rid = self.add_request(prompt, sampling)
        try:
            while rid in self.requests and not self.output(rid).finished:
                for d in self.step():
                    if d.request_id == rid:
                        yield d
        finally:
            self.abort(rid)
            self.requests.pop(rid, None)

    # ---- state ----
    def stats(self) -> dict[str, Any]:
        """Numbers for /metrics; with a draft also spec_drafts (rounds), spec_draft_tokens (proposals),
        spec_accepted_tokens (proposals kept) and spec_accepted_per_pos (per place in a round)."""
        return {
            "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
            "kv_cache_usage": self.blocks.usage(), "kv_blocks": self.blocks.num_blocks,
            "prefix_cache_queries": self.blocks.queries, "prefix_cache_hits": self.blocks.hits,
            "preemptions": self.scheduler.preemptions, "generated_tokens": self.generated_tokens,
            "prompt_tokens": self.prompt_tokens, **(self.drafter.stats() if self.drafter is not None else {}),
        }
