"""Text generation, the simple way: `generate` (text) and `generate_ids` (token ids), on the engine.

Every entry point runs on gptlab.infer.engine.Engine (one decode path): the prompts join one continuously
batched workload, each row generating exactly what it would alone, and stop at the same ids (`stop_ids`).

    text = generate(model, tok, "The with statement", max_new_tokens=40, temperature=0.8, top_k=50, seed=0)
    for piece in generate(model, tok, "Hello", stream=True): print(piece, end="")
    chat = PromptCache()                      # reuse the KV cache of a conversation across calls
    reply = generate(model, tok, history_text, cache=chat)
    record = generate(model, tok, "A user:", json_schema={"type": "object", ...})   # always parses
    text = generate(model, tok, "The with statement", temperature=0, draft=small)  # speculative decoding
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from gptlab.errors import GptlabError
from gptlab.infer.engine import Engine, EngineConfig
from gptlab.infer.sampling import Sampling
from gptlab.infer.structured import Constraint
from gptlab.infer.text import TextRow, stop_ids

__all__ = ["generate", "generate_ids", "PromptCache", "Sampling", "TextRow", "stop_ids", "engine_for"]

MAX_PREFILL = 8192  # tokens one forward pass of a one-off engine prefills at most (bounds activation memory)


def engine_for(model, tokenizer, prompt_lens: Sequence[int], s: Sampling, draft=None, draft_tokens: int = 4) -> Engine:
    """An engine sized for these requests: a KV pool holding all of them, prompts prefilled in one pass (and,
    with a draft model, room in a step for every sequence's proposals)."""
    bs = 16
    rows = len(prompt_lens) * s.n
    blocks = sum(-(-min(n + s.max_new_tokens, model.config.context_length) // bs) for n in prompt_lens) * s.n
    tokens = max(1, min(sum(prompt_lens) * s.n, MAX_PREFILL), rows * (1 + draft_tokens) if draft is not None else 0)
    return Engine(model, tokenizer, EngineConfig(max_batch=rows, max_batched_tokens=tokens, block_size=bs,
                                                 num_blocks=blocks + 1, max_waiting=rows, draft_tokens=draft_tokens),
                  draft=draft)


class PromptCache:
    """A KV cache kept across generate() calls for one conversation: each call reuses the cached blocks of the
    earlier prompts and replies (prefix caching, whole blocks of 16 tokens), so it prefills only what is new.

    `reused` is how many prompt tokens the last call took from the cache; `reset()` forgets everything.
    """

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.reused = 0

    def reset(self) -> None:
        self.engine, self.reused = None, 0

    def engine_for(self, model, tokenizer, draft=None, draft_tokens: int = 4) -> Engine:
        e = self.engine
        w = model.wte.weight
        same_draft = e is not None and (e.drafter.model if e.drafter else None) is draft and \
            e.config.draft_tokens == draft_tokens
        if e is None or e.model is not model or (e.dtype, e.device) != (w.dtype, w.device) or not same_draft:
            blocks = 2 * -(-model.config.context_length // 16) + 1  # a whole context twice: history and reply
            self.engine = Engine(model, tokenizer, EngineConfig(max_batch=1, block_size=16, num_blocks=blocks,
                                                                max_batched_tokens=MAX_PREFILL, max_waiting=1,
                                                                draft_tokens=draft_tokens), draft=draft)
        return self.engine


_SHORTHANDS = {"json_schema": Constraint.json_schema, "regex": Constraint.regex, "choice": Constraint.choice,
               "grammar": Constraint.lark}


def _sampling(kwargs: dict) -> Sampling:
    """Sampling from keyword arguments; json_schema=, regex=, choice= or grammar= stand for constraint=."""
    given = [k for k in _SHORTHANDS if kwargs.get(k) is not None]
    if len(given) + (kwargs.get("constraint") is not None) > 1:
        raise GptlabError(f"pass one constraint at most (got {', '.join(given + ['constraint'] * ('constraint' in kwargs))})")
    for k in _SHORTHANDS:
        value = kwargs.pop(k, None)
        if value is not None:
            kwargs["constraint"] = _SHORTHANDS[k](value)
    return Sampling(**kwargs)


def generate_ids(model, prompts: Sequence[Sequence[int]], tokenizer=None, *, draft=None, draft_tokens: int = 4,
                 **sampling) -> list[list[int]]:
    """New token ids for each prompt (the stop id excluded), greedy unless temperature > 0. draft: a small model
    of the same tokenizer proposing draft_tokens tokens per step (speculative decoding; the same output)."""
    s = sampling.pop("sampling", None) or _sampling(sampling)
    if s.n != 1:
        raise GptlabError("generate_ids takes n=1; use gptlab.infer.engine.Engine for several samples per prompt")
    prompts = [list(p) for p in prompts]
    if not prompts:
        raise GptlabError("no prompts given")
    outs = engine_for(model, tokenizer, [max(1, len(p)) for p in prompts], s, draft, draft_tokens).generate(prompts, s)
    return [o.outputs[0].token_ids for o in outs]


def _stream(engine: Engine, prompt: str, s: Sampling, cache: PromptCache | None) -> Iterator[str]:
    rid = engine.add_request(prompt, s)
    try:
        while not engine.output(rid).finished:
            for d in engine.step():
                if d.request_id == rid and d.text:
                    yield d.text
            if cache is not None:
                cache.reused = engine.output(rid).num_cached_tokens
    finally:
        engine.abort(rid)
        engine.requests.pop(rid, None)


def generate(
    model,
    tokenizer,
    prompt: str | list[str],
    *,
    stream: bool = False,
    cache: PromptCache | None = None,
    draft=None,
    draft_tokens: int = 4,
    **sampling,
) -> str | list[str] | Iterator[str]:
    """Continue `prompt` (a string, or a list of strings generated as one batch).

    Returns the new text (without the prompt, stop strings or EOS); with stream=True (one prompt only), an
    iterator of text pieces as they are produced. cache: a `PromptCache` to reuse across calls (one prompt
    only). Other keyword arguments are `Sampling` fields; json_schema= (a dict), regex=, choice= (a list)
    or grammar= (Lark) constrain the output (gptlab/infer/structured.py). draft: a small model of the same
    tokenizer proposing draft_tokens tokens per step (speculative decoding, gptlab/infer/speculative.py).
    """
    s = _sampling(sampling)
    if s.n != 1:
        raise GptlabError("generate takes n=1; use gptlab.infer.engine.Engine for several samples per prompt")
    single = isinstance(prompt, str)
    texts = [prompt] if single else list(prompt)
    if not texts:
        raise GptlabError("no prompts given")
    if cache is not None and not single:
        raise GptlabError("a PromptCache serves one prompt at a time")
    if cache is not None:
        engine = cache.engine_for(model, tokenizer, draft, draft_tokens)
    else:
        engine = engine_for(model, tokenizer, [max(1, len(tokenizer.encode(t))) for t in texts], s, draft, draft_tokens)
    if stream:
        if not single:
            raise GptlabError("stream=True takes a single prompt")
        return _stream(engine, texts[0], s, cache)
    if cache is not None:
        return "".join(_stream(engine, texts[0], s, cache))
    outs = [o.outputs[0].text for o in engine.generate(texts, s)]
    return outs[0] if single else outs
