"""Which tokens run in the next engine step: sequences, the block manager and the scheduler (nano-vllm's shape).

- A `Sequence` is one generation: its tokens (prompt + output), how many of them have keys and values in
  the cache (`num_computed`), and its block table (which cache blocks hold them, in order).
- The `BlockManager` hands out fixed-size blocks of the KV pool with reference counts. A block that is full
  gets a hash of its tokens and of everything before them, so a later sequence that starts with the same
  tokens (a system prompt, a chat history, the n samples of one prompt) reuses it instead of recomputing it
  (prefix caching); a sequence's `cache_salt` (its LoRA adapter) starts the chain, so adapters never share.
  A freed block keeps its contents and hash until it is handed out again, oldest first.
- The `Scheduler` keeps a waiting queue and a running list. Each step: every running sequence gets its next
  token (or the rest of a prompt chunk); waiting sequences are admitted while the token budget, the batch
  limit and free blocks allow; a long prompt is prefilled in chunks so it does not stall the others. When
  a running sequence needs a block and none is free, the most recently admitted one is preempted: its
  blocks are freed and it waits again, to be recomputed from its tokens. With a draft model (speculative
  decoding), a decoding sequence also gets slots for the draft's proposals where the budget and free blocks
  allow (`lookahead`); those never preempt anything.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from gptlab.errors import GptlabError


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    tokens: list[int]  # prompt + generated so far (+ forced tokens not yet computed)
    num_prompt: int
    data: Any = None  # what the engine keeps per sequence (sampling, text, stop state)
    id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose keys and values are in the blocks
    num_hashed: int = 0  # leading full blocks registered in the prefix cache
    num_cached: int = 0  # prompt tokens found in the prefix cache at the last admission
    num_drafted: int = 0  # leading tokens whose keys and values are in the draft's pool (speculative decoding;
    # only the first min(num_drafted, num_computed) count)
    leader: "Sequence | None" = None  # the first of n samples: admitted after its prompt is cached
    cache_salt: int = 0  # starts its blocks' hash chain: sequences whose keys differ for the same tokens
    # (a LoRA adapter's) never share cached blocks
    finish_reason: str | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def pending(self) -> int:
        """Tokens waiting to be computed (a prompt chunk, or the last sampled / forced tokens)."""
        return len(self.tokens) - self.num_computed


# ---------------------------------------------------------------------------------------------------------
# blocks


class BlockManager:
    """Reference-counted blocks of `block_size` token slots, with hashed full blocks for prefix caching."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise GptlabError(f"the KV cache needs at least one block (got {num_blocks} of {block_size} tokens)")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.by_hash: dict[int, int] = {}
        self.free: dict[int, None] = dict.fromkeys(range(num_blocks))  # ordered: oldest freed first
        self.hits = self.queries = 0  # prompt tokens found in / looked up in the prefix cache

    @property
    def num_free(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        """Share of blocks some running sequence holds (freed, still-cached blocks count as free)."""
        return 1.0 - len(self.free) / self.num_blocks

    def _hash(self, seq: Sequence, i: int) -> int:
        prev = self.block_hash[seq.block_table[i - 1]] if i else seq.cache_salt
        return hash((prev, tuple(seq.tokens[i * self.block_size:(i + 1) * self.block_size])))

    def _take(self) -> int:
        block = next(iter(self.free))  # the longest-free block: its cached prefix is the least recent
        del self.free[block]
        h = self.block_hash[block]
        if h is not None and self.by_hash.get(h) == block:
            del self.by_hash[h]
        self.block_hash[block] = self.block_tokens[block] = None
        self.ref[block] = 1
        return block

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def admit(self, seq: Sequence) -> None:
        """Give a waiting sequence the cached blocks of its longest cached prefix (whole blocks, never its last
        token, whose logits are needed); its other blocks are allocated as it computes."""
        bs = self.block_size
        prev, reused = seq.cache_salt, []
        for i in range((len(seq) - 1) // bs):  # full blocks that end before the last token
            chunk = tuple(seq.tokens[i * bs:(i + 1) * bs])
            h = hash((prev, chunk))
            block = self.by_hash.get(h)
            if block is None or self.block_tokens[block] != chunk:
                break
            reused.append(block)
            prev = h
        for block in reused:
            if self.ref[block] == 0:
                del self.free[block]
            self.ref[block] += 1
        seq.block_table = reused
        seq.num_hashed = len(reused)
        seq.num_computed = seq.num_cached = seq.num_drafted = len(reused) * bs

    def count_admission(self, seq: Sequence) -> None:
        """Prefix-cache statistics of an admitted sequence (prompt tokens looked up and found)."""
        self.queries += seq.num_prompt
        self.hits += min(seq.num_cached, seq.num_prompt)

    def can_grow(self, seq: Sequence, n_tokens: int) -> bool:
        return self.blocks_for(n_tokens) - len(seq.block_table) <= len(self.free)

    def grow(self, seq: Sequence, n_tokens: int) -> None:
        """Enough blocks for the first n_tokens of seq (call after can_grow)."""
        while len(seq.block_table) < self.blocks_for(n_tokens):
            seq.block_table.append(self._take())

    def computed(self, seq: Sequence, upto: int | None = None) -> None:
        """Register the blocks seq has filled since the last call (their tokens now have keys and values), within
        its first `upto` tokens (default: all it has computed; with a draft: what both models have read)."""
        full = (seq.num_computed if upto is None else min(upto, seq.num_computed)) // self.block_size
        for i in range(seq.num_hashed, full):
            block = seq.block_table[i]
            h = self._hash(seq, i)
            self.block_hash[block] = h
            self.block_tokens[block] = tuple(seq.tokens[i * self.block_size:(i + 1) * self.block_size])
            self.by_hash.setdefault(h, block)  # an identical block cached earlier keeps serving lookups
        seq.num_hashed = max(seq.num_hashed, full)

    def release(self, seq: Sequence) -> None:
        """Drop seq's references; unreferenced blocks become free but keep their cached contents."""
        for block in reversed(seq.block_table):
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free[block] = None
        seq.block_table, seq.num_computed, seq.num_hashed = [], 0, 0


# ---------------------------------------------------------------------------------------------------------
# the scheduler


@dataclass
class Step:
    """What one forward pass computes: for each sequence, how many of its pending tokens, and how many slots
    after them it may fill with a draft's proposals (speculative decoding; 0 without a draft)."""

    seqs: list[Sequence]
    counts: list[int]
    lookahead: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch: int, max_tokens: int, max_waiting: int,
                 lookahead: Callable[[Sequence], int] | None = None) -> None:
        """lookahead(seq): proposal slots a decoding sequence wants this step (a draft model's; None: no draft)."""
        self.blocks = blocks
        self.lookahead = lookahead
        self.max_batch, self.max_tokens, self.max_waiting = max_batch, max_tokens, max_waiting
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"the waiting queue is full ({self.max_waiting} requests)")
        if self.blocks.blocks_for(len(seq)) > self.blocks.num_blocks:
            raise GptlabError(f"a sequence of {len(seq)} tokens does not fit the KV cache "
                              f"({self.blocks.num_blocks} blocks of {self.blocks.block_size} tokens)")
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.FINISHED

    def _preempt(self, victim: Sequence, step: Step) -> None:
        self.running.remove(victim)
        self.blocks.release(victim)
        victim.status = Status.WAITING
        self.waiting.appendleft(victim)
        step.preempted.append(victim)
        self.preemptions += 1

    def schedule(self) -> Step:
        step = Step([], [])
        budget = self.max_tokens
        # running sequences first, in admission order: their next token (or the next chunk of their prompt)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.pending, budget)
            while not self.blocks.can_grow(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim, step)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break  # it preempted itself: nothing later in the list is left either
            self.blocks.grow(seq, seq.num_computed + n)
            step.seqs.append(seq)
            step.counts.append(n)
            budget -= n
            i += 1
        step.lookahead = [0] * len(step.seqs)
        if self.lookahead is not None:
            budget = self._reserve(step, budget)
        # then waiting ones, first come first served, while the batch, the budget and the blocks allow
        while self.waiting and budget > 0 and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if seq.leader is not None and seq.leader.status is not Status.FINISHED and \
                    seq.leader.num_computed < seq.leader.num_prompt:
                break  # the n samples of a prompt start once its prompt is cached, and share those blocks
            self.blocks.admit(seq)
            n = min(seq.pending, budget)
            if not self.blocks.can_grow(seq, seq.num_computed + n):
                self.blocks.release(seq)
                break
            self.waiting.popleft()
            self.blocks.count_admission(seq)
            self.blocks.grow(seq, seq.num_computed + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            step.seqs.append(seq)
            step.counts.append(n)
            step.lookahead.append(0)
            budget -= n
        return step

    def _reserve(self, step: Step, budget: int) -> int:
        """Slots for draft proposals after each decoding sequence's pending token, within the token budget and
        the free blocks (never preempting: a sequence without room decodes one token); returns the budget left."""
        bs = self.blocks.block_size
        for j, seq in enumerate(step.seqs):
            if seq.pending != 1 or budget <= 0:
                continue
            room = (len(seq.block_table) + self.blocks.num_free) * bs - seq.num_computed - 1
            want = min(self.lookahead(seq), budget, room)
            if want > 0:
                self.blocks.grow(seq, seq.num_computed + 1 + want)
                step.lookahead[j] = want
                budget -= want
        return budget


class QueueFull(GptlabError):
    """The waiting queue is at its limit: try again later (the server answers 503)."""
