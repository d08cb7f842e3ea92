"""Text generation: prefill the static KV cache once, then one token per step.

Batched prompts of different lengths are left-padded; each row generates exactly what it would alone.
Every entry point (generate, generate_ids, generate_tokens) stops at the same ids: `stop_ids`.

    text = generate(model, tok, "The with statement", max_new_tokens=40, temperature=0.8, top_k=50, seed=0)
    for piece in generate(model, tok, "Hello", stream=True): print(piece, end="")
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from gptlab.errors import GptlabError
from gptlab.infer.sampling import Sampling, next_token


# ---------------------------------------------------------------------------------------------------------
# the token loop


def stop_ids(config, eos_id: int | list[int] | None = None, tokenizer=None) -> set[int]:
    """The ids that end a row, for every generation entry point: `eos_id` when given (Sampling.eos_id), else
    the model's own config.eos_token_id (an int, or a list as in Qwen's configs), else the tokenizer's EOS."""
    for ids in (eos_id, config.eos_token_id, None if tokenizer is None else tokenizer.eos_id):
        if ids is not None:
            return set(ids) if isinstance(ids, (list, tuple, set)) else {ids}
    return set()


def _fit_prompts(prompts: list[list[int]], s: Sampling, context: int, start_id: int | None) -> list[list[int]]:
    out = []
    for i, p in enumerate(prompts):
        if not p:
            if start_id is None:
                raise GptlabError(f"prompt {i} is empty and the model has no BOS/EOS token to start from")
            p = [start_id]
        room = context - s.max_new_tokens
        if len(p) > room:
            if not s.truncate or room < 1:
                raise GptlabError(
                    f"prompt of {len(p)} tokens + max_new_tokens={s.max_new_tokens} exceeds the model's context of "
                    f"{context}; shorten the prompt, lower max_new_tokens, or pass truncate=True (--truncate) to "
                    f"keep only the last {max(room, 0)} prompt tokens"
                )
            p = p[len(p) - room:]
        out.append(list(p))
    return out


class PromptCache:
    """A batch-1 KV cache kept between generate calls, so a prompt that starts with tokens already cached
    (a conversation's history) prefills only what is new: the longest common token prefix is reused.

    One per conversation (`gptlab chat` keeps one); between calls the model itself holds no cache, so other
    uses of the model are unaffected. `reset()` forgets the cached tokens.
    """

    def __init__(self) -> None:
        self.ids: list[int] = []  # the tokens whose keys and values fill the first len(ids) slots
        self.layers: list | None = None  # one KVCache per block
        self.model_id: int | None = None
        self.reused = 0  # prompt tokens the last call took from the cache instead of recomputing

    def reset(self) -> None:
        self.ids, self.reused = [], 0

    def attach(self, model, prompt: list[int], length: int) -> int:
        """Install the cache on `model` with at least `length` slots; return how many prompt tokens it holds."""
        w = model.wte.weight
        moved = self.layers is not None and (self.layers[0].k.dtype, self.layers[0].k.device) != (w.dtype, w.device)
        if self.model_id != id(model) or moved:  # another model, or this one cast / moved: start afresh
            self.layers, self.ids, self.model_id = None, [], id(model)
        keep = 0
        limit = min(len(self.ids), len(prompt) - 1)  # at least one token is run, for the next logits
        while keep < limit and self.ids[keep] == prompt[keep]:
            keep += 1
        if self.layers is None or self.layers[0].k.shape[2] < length:
            old = self.layers
            grow = 0 if old is None else 2 * old[0].k.shape[2]  # double, so a growing chat rarely reallocates
            model.setup_cache(1, min(max(length, grow), model.config.context_length))
            self.layers = [block.attn.kv_cache for block in model.blocks]
            if old is not None and keep:
                for new, prev in zip(self.layers, old):
                    new.k[:, :, :keep] = prev.k[:, :, :keep]
                    new.v[:, :, :keep] = prev.v[:, :, :keep]
        else:
            for block, layer in zip(model.blocks, self.layers):
                block.attn.kv_cache = layer
        self.ids, self.reused = self.ids[:keep], keep
        return keep


@torch.inference_mode()
def generate_tokens(model, prompts: Sequence[Sequence[int]], s: Sampling,
                    cache: PromptCache | None = None, tokenizer=None) -> Iterator[list[int]]:
    """Yield, per step, the next token of every row (B ints). Rows that hit EOS keep yielding EOS.

    Stops after max_new_tokens steps or when every row has produced one of `stop_ids`. cache: reuse and
    extend a `PromptCache` (one prompt only). tokenizer: only consulted for its EOS (see `stop_ids`).
    """
    config = model.config
    eos_ids = stop_ids(config, s.eos_id, tokenizer)
    start = config.bos_token_id if config.bos_token_id is not None else min(eos_ids, default=None)
    prompts = _fit_prompts([list(p) for p in prompts], s, config.context_length, start)
    device = model.wte.weight.device
    B, L = len(prompts), max(len(p) for p in prompts)
    pad_lens = torch.tensor([L - len(p) for p in prompts], device=device)
    idx = torch.tensor([[0] * (L - len(p)) + p for p in prompts], device=device)  # (B, L), left-padded
    gen = None
    if s.seed is not None:
        gen = torch.Generator(device=device).manual_seed(s.seed)
    history = [list(p) for p in prompts]
    done = [False] * B
    padded = bool(pad_lens.any())
    start = 0
    if cache is None:
        model.setup_cache(B, L + s.max_new_tokens)
    elif B != 1:
        raise GptlabError("a PromptCache serves one prompt at a time")
    else:
        start = cache.attach(model, prompts[0], L + s.max_new_tokens)
    try:
        pos = torch.arange(start, L, device=device)
        hidden = model(idx[:, start:], input_pos=pos, pad_lens=pad_lens if padded else None, return_hidden=True)
        if cache is not None:
            cache.ids = list(prompts[0])
        logits = model.lm_head(hidden[:, -1])  # (B, V): only the last position is needed
        for step in range(s.max_new_tokens):
            tok = next_token(logits, s, history, gen)
            toks = tok.tolist()
            for row in range(B):
                if done[row]:
                    toks[row] = min(eos_ids)
                else:
                    history[row].append(toks[row])
                    done[row] = toks[row] in eos_ids
            yield toks
            if all(done) or step == s.max_new_tokens - 1:
                break
            pos = torch.tensor([L + step], device=device)
            logits = model(tok[:, None], input_pos=pos, pad_lens=pad_lens if padded else None)[:, -1]
            if cache is not None:
                cache.ids.append(toks[0])
    finally:
        model.clear_cache()  # a PromptCache keeps its tensors; the model holds none between calls


def generate_ids(model, prompts: Sequence[Sequence[int]], tokenizer=None, **sampling) -> list[list[int]]:
    """New token ids for each prompt (the stop id excluded), greedy unless temperature > 0."""
    s = sampling.pop("sampling", None) or Sampling(**sampling)
    eos_ids = stop_ids(model.config, s.eos_id, tokenizer)
    out: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for toks in generate_tokens(model, prompts, s, tokenizer=tokenizer):
        for row, t in enumerate(toks):
            if finished[row]:
                continue
            if t in eos_ids:
                finished[row] = True
            else:
                out[row].append(t)
    return out


# ---------------------------------------------------------------------------------------------------------
# text in, text out


class TextRow:
    """Incremental decoding of one row: complete characters only, stop strings cut and held back."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tok, self.stop, self.ids, self.emitted, self.finished = tokenizer, stop, [], 0, False
        self.text = ""

    def add(self, token: int) -> str:
        """Append a token; return the newly final text (may be empty)."""
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        for stop in self.stop:
            cut = text.find(stop)
            if cut != -1:
                text, self.finished = text[:cut], True
        self.text = text
        if self.finished:
            return self._flush(len(text))
        safe = len(text)
        while safe and text[safe - 1] == "\ufffd":  # an incomplete UTF-8 sequence (e.g. half a 汉字)
            safe -= 1
        for stop in self.stop:  # hold back a tail that could still become a stop string
            for n in range(min(len(stop) - 1, safe), 0, -1):
                if text[safe - n:safe] == stop[:n]:
                    safe -= n
                    break
        return self._flush(safe)

    def _flush(self, upto: int) -> str:
        piece = self.text[self.emitted:upto]
        self.emitted = max(self.emitted, upto)
        return piece

    def rest(self) -> str:
        return self._flush(len(self.text))


def _stream(model, tokenizer, prompts, s: Sampling, cache: PromptCache | None = None) -> Iterator[tuple[int, str]]:
    eos_ids = stop_ids(model.config, s.eos_id, tokenizer)
    rows = [TextRow(tokenizer, s.stop) for _ in prompts]
    for toks in generate_tokens(model, prompts, s, cache, tokenizer=tokenizer):
        for i, t in enumerate(toks):
            row = rows[i]
            if row.finished:
                continue
            if t in eos_ids:
                row.finished = True
                piece = row.rest()
            else:
                piece = row.add(t)
            if piece:
                yield i, piece
        if all(r.finished for r in rows):
            break
    for i, row in enumerate(rows):
        piece = row.rest()
        if piece:
            yield i, piece


def generate(
    model,
    tokenizer,
    prompt: str | list[str],
    *,
    stream: bool = False,
    cache: PromptCache | None = None,
    **sampling,
) -> str | list[str] | Iterator[str]:
    """Continue `prompt` (a string, or a list of strings generated as one batch).

    Returns the new text (without the prompt, stop strings or EOS); with stream=True (one prompt only), an
    iterator of text pieces as they are produced. cache: a `PromptCache` to reuse across calls (one prompt
    only). Other keyword arguments are `Sampling` fields.
    """
    s = Sampling(**sampling)
    single = isinstance(prompt, str)
    texts = [prompt] if single else list(prompt)
    if not texts:
        raise GptlabError("no prompts given")
    prompts = [tokenizer.encode(t) for t in texts]
    if stream:
        if not single:
            raise GptlabError("stream=True takes a single prompt")
        return (piece for _, piece in _stream(model, tokenizer, prompts, s, cache))
    outs = [""] * len(texts)
    for i, piece in _stream(model, tokenizer, prompts, s, cache):
        outs[i] += piece
    return outs[0] if single else outs
