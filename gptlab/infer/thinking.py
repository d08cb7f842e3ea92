"""Reasoning models (Qwen3, DeepSeek-R1 style): the <think>...</think> block, a budget on it, and splitting
the reasoning from the answer.

The engine follows each sequence's reasoning by token id: it is in a reasoning block when the prompt
leaves a <think> open (templates of Qwen3-Thinking-2507 and DeepSeek-R1 open it for the model) or when the
model writes <think> itself; it leaves at </think>. With a budget of N, after N reasoning tokens the
engine appends Qwen's early-stop text, which closes the block, and the model goes on with its answer; the
forced tokens count as generated (within max_tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

# Qwen's text for ending reasoning early (Qwen3 model card, "thinking budget")
EARLY_STOP = ("\n\nConsidering the limited time by the user, I have to give the solution based on the thinking "
              "directly now.\n</think>\n\n")
START, END = "<think>", "</think>"


@dataclass(frozen=True)
class ThinkingTags:
    start_id: int
    end_id: int
    early_stop: tuple[int, ...]  # EARLY_STOP as token ids (it ends with end_id)


def thinking_tags(tokenizer) -> ThinkingTags | None:
    """The tokenizer's <think> / </think> ids, when both are single tokens; None for models without them."""
    if tokenizer is None:
        return None
    start, end = tokenizer.token_id(START), tokenizer.token_id(END)
    if start is None or end is None:
        return None
    return ThinkingTags(start, end, tuple(tokenizer.encode(EARLY_STOP)))


def opened_by(prompt: list[int], tags: ThinkingTags | None) -> bool:
    """Whether the prompt ends inside a reasoning block (the template opened <think> for the model)."""
    if tags is None:
        return False
    last_start = max((i for i, t in enumerate(prompt) if t == tags.start_id), default=-1)
    last_end = max((i for i, t in enumerate(prompt) if t == tags.end_id), default=-1)
    return last_start > last_end


class ThinkState:
    """One sequence's reasoning: inside a block or not, reasoning tokens so far, and the budget."""

    def __init__(self, tags: ThinkingTags | None, budget: int | None, prompt: list[int]) -> None:
        self.tags, self.budget = tags, budget
        self.inside = opened_by(prompt, tags)
        self.done = False  # a block has closed: nothing more is counted
        self.count = 0

    def due(self) -> bool:
        """Whether the budget is spent inside an open block (the early-stop text is to be appended now)."""
        return self.inside and self.budget is not None and self.count >= self.budget

    def on_token(self, token: int) -> None:
        if self.tags is None or self.done:
            return
        if token == self.tags.end_id and self.inside:
            self.inside, self.done = False, True
        elif token == self.tags.start_id and not self.inside:
            self.inside = True
        elif self.inside:
            self.count += 1

    def force(self) -> list[int]:
        """The early-stop tokens; the block ends with them."""
        self.inside, self.done = False, True
        return list(self.tags.early_stop)


class ReasoningSplitter:
    """Split generated text into (reasoning, answer) as it streams: text inside <think>...</think> (or from the
    start, when the prompt opened the block) is reasoning, the tags themselves are neither, the rest is answer
    (without the blank line that follows </think>). A tag split across two pieces is held back until whole."""

    def __init__(self, opened: bool) -> None:
        self.inside = opened
        self.closed = False
        self._strip = False  # drop newlines at the start of the answer, after </think>
        self._held = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        text = self._held + text
        self._held = ""
        reasoning, answer = [], []
        while text:
            if self.closed:
                if self._strip:
                    text = text.lstrip("\n")
                    self._strip = not text
                answer.append(text)
                break
            tag = END if self.inside else START
            at = text.find(tag)
            if at != -1:
                (reasoning if self.inside else answer).append(text[:at])
                text = text[at + len(tag):]
                if self.inside:
                    self.closed = self._strip = True
                self.inside = not self.inside
                continue
            keep = 0 if final else next((n for n in range(len(tag) - 1, 0, -1) if text.endswith(tag[:n])), 0)
            (reasoning if self.inside else answer).append(text[:len(text) - keep])
            self._held = text[len(text) - keep:]
            break
        return "".join(reasoning), "".join(answer)


def split_reasoning(text: str, opened: bool) -> tuple[str, str]:
    """(reasoning, answer) of a whole generated text (see ReasoningSplitter)."""
    return ReasoningSplitter(opened).feed(text, final=True)
