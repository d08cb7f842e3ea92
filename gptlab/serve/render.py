"""Engine deltas -> OpenAI response bodies and stream chunks, for /v1/completions and /v1/chat/completions.

Usage counts every generated token (a stop token included) as completion tokens, and reports the prompt
tokens served from the prefix cache as `prompt_tokens_details.cached_tokens`. Log-probabilities are those
of the model's distribution before the sampling processors, in each endpoint's OpenAI shape.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from gptlab.infer.engine import Delta
from gptlab.infer.sampling import TokenLogprobs
from gptlab.infer.thinking import ReasoningSplitter
from gptlab.serve.structured import CallStream


def _now() -> int:
    return int(time.time())


def _finite(logprob: float) -> float:
    """JSON has no -inf: a token of probability 0 in float is reported as -9999.0, as vLLM does."""
    return max(logprob, -9999.0)


@dataclass
class _Choice:
    text: str = ""
    reasoning: str = ""
    tokens: int = 0
    finish: str | None = None
    logprobs: list[tuple[int, TokenLogprobs]] = field(default_factory=list)
    calls: list[dict] = field(default_factory=list)  # tool calls parsed from the answer

    @property
    def finish_reason(self) -> str | None:
        return "tool_calls" if self.calls and self.finish == "stop" else self.finish


class _Job:
    def __init__(self, prefix: str, model: str, tokenizer, n_choices: int) -> None:
        self.id, self.created, self.model, self.tok = f"{prefix}-{uuid.uuid4().hex}", _now(), model, tokenizer
        self.choices = [_Choice() for _ in range(n_choices)]
        self.prompt_tokens = 0
        self.cached = 0

    def _token(self, t: int) -> str:
        return self.tok.decode([t])

    def usage(self) -> dict:
        done = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done, "prompt_tokens_details": {"cached_tokens": self.cached}}


class Completion(_Job):
    """One /v1/completions request: len(prompts) x n choices, choice index = prompt * n + sample."""

    def __init__(self, model: str, tokenizer, prompts: list[list[int]], n: int, echo: bool, logprobs: bool) -> None:
        super().__init__("cmpl", model, tokenizer, len(prompts) * n)
        self.n, self.echo, self.want_logprobs = n, echo, logprobs
        self.prompt_text = [tokenizer.decode(p) for p in prompts]
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.offsets = [len(self.prompt_text[i // n]) if echo else 0 for i in range(len(self.choices))]

    def add(self, prompt: int, d: Delta) -> _Choice:
        c = self.choices[prompt * self.n + d.index]
        if d.index == 0 and d.finished:
            self.cached += d.cached  # once per prompt
        c.text += d.text
        c.tokens += d.generated
        c.finish = d.finish_reason or c.finish
        c.logprobs += list(zip(d.token_ids, d.logprobs))
        return c

    def _logprobs(self, i: int, pairs: list[tuple[int, TokenLogprobs]]) -> dict | None:
        if not self.want_logprobs:
            return None
        tokens, lps, tops, offsets = [], [], [], []
        for t, lp in pairs:
            s = self._token(t)
            tokens.append(s)
            lps.append(_finite(lp.logprob))
            tops.append({self._token(a): _finite(v) for a, v in lp.top})
            offsets.append(self.offsets[i])
            self.offsets[i] += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def response(self) -> dict:
        choices = []
        for i, c in enumerate(self.choices):
            text = (self.prompt_text[i // self.n] if self.echo else "") + c.text
            choices.append({"index": i, "text": text, "logprobs": self._logprobs(i, c.logprobs),
                            "finish_reason": c.finish})
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    def _chunk(self, i: int, text: str, logprobs, finish: str | None) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

    def first_chunks(self, prompt: int) -> list[dict]:
        if not self.echo:
            return []
        return [self._chunk(prompt * self.n + j, self.prompt_text[prompt], None, None) for j in range(self.n)]

    def chunk(self, prompt: int, d: Delta) -> dict:
        i = prompt * self.n + d.index
        self.add(prompt, d)
        return self._chunk(i, d.text, self._logprobs(i, list(zip(d.token_ids, d.logprobs))), d.finish_reason)

    def usage_chunk(self) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [], "usage": self.usage()}


class Chat(_Job):
    """One /v1/chat/completions request: n choices, each split into reasoning and answer as it streams, and
    the answer into content and tool calls when the request has tools."""

    def __init__(self, model: str, tokenizer, prompt_tokens: int, n: int, logprobs: bool, opened: bool,
                 tools: bool = False) -> None:
        super().__init__("chatcmpl", model, tokenizer, n)
        self.prompt_tokens, self.want_logprobs = prompt_tokens, logprobs
        self.splitters = [ReasoningSplitter(opened) for _ in range(n)]
        self.calls = [CallStream() for _ in range(n)] if tools else None

    def _feed(self, d: Delta) -> tuple[str, str, list[dict]]:
        c = self.choices[d.index]
        if d.index == 0 and d.finished:
            self.cached = d.cached
        reasoning, answer = self.splitters[d.index].feed(d.text, final=d.finished)
        calls = []
        if self.calls is not None:
            answer, calls = self.calls[d.index].feed(answer, final=d.finished)
            c.calls += calls
        c.reasoning += reasoning
        c.text += answer
        c.tokens += d.generated
        c.finish = d.finish_reason or c.finish
        c.logprobs += list(zip(d.token_ids, d.logprobs))
        return reasoning, answer, calls

    def add(self, d: Delta) -> None:
        self._feed(d)

    def _content_logprobs(self, pairs: list[tuple[int, TokenLogprobs]]) -> dict | None:
        if not self.want_logprobs:
            return None

        def entry(t: int, lp: float) -> dict:
            s = self._token(t)
            return {"token": s, "logprob": _finite(lp), "bytes": list(s.encode("utf-8"))}

        return {"content": [{**entry(t, lp.logprob), "top_logprobs": [entry(a, v) for a, v in lp.top]}
                            for t, lp in pairs]}

    def response(self) -> dict:
        choices = []
        for i, c in enumerate(self.choices):
            message = {"role": "assistant", "content": c.text}
            if c.reasoning:
                message["reasoning_content"] = c.reasoning
            if c.calls:
                message["content"] = c.text.strip() or None
                message["tool_calls"] = c.calls
            choices.append({"index": i, "message": message, "logprobs": self._content_logprobs(c.logprobs),
                            "finish_reason": c.finish_reason})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    def _chunk(self, i: int, delta: dict, logprobs=None, finish: str | None = None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

    def first_chunks(self) -> list[dict]:
        return [self._chunk(i, {"role": "assistant", "content": ""}) for i in range(len(self.choices))]

    def chunks(self, d: Delta) -> list[dict]:
        before = len(self.choices[d.index].calls)
        reasoning, answer, calls = self._feed(d)
        logprobs = self._content_logprobs(list(zip(d.token_ids, d.logprobs)))
        out = []
        if reasoning:
            out.append(self._chunk(d.index, {"reasoning_content": reasoning}))
        if answer or logprobs:
            out.append(self._chunk(d.index, {"content": answer}, logprobs))
        for k, call in enumerate(calls, start=before):  # a whole call per delta, once its block has closed
            out.append(self._chunk(d.index, {"tool_calls": [{"index": k, **call}]}))
        if d.finished:
            out.append(self._chunk(d.index, {}, None, self.choices[d.index].finish_reason))
        return out

    def usage_chunk(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": self.usage()}
