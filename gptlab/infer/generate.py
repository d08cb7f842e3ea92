"""Text generation: prefill the static KV cache once, then one token per step.

Processors run in transformers' order (repetition penalty, no-repeat n-gram, temperature, top-k, top-p),
so greedy output and seeded sampling are reproducible and greedy matches `transformers.generate`.
Batched prompts of different lengths are left-padded; each row generates exactly what it would alone.

    text = generate(model, tok, "The with statement", max_new_tokens=40, temperature=0.8, top_k=50, seed=0)
    for piece in generate(model, tok, "Hello", stream=True): print(piece, end="")
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from gptlab.cli import command
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
# logits processors, each (B, V) -> (B, V)


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


# ---------------------------------------------------------------------------------------------------------
# the token loop


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
            model.setup_cache(1, min(max(length, grow), model.config.block_size))
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
                    cache: PromptCache | None = None) -> Iterator[list[int]]:
    """Yield, per step, the next token of every row (B ints). Rows that hit EOS keep yielding EOS.

    Stops after max_new_tokens steps or when every row has produced an EOS id. cache: reuse and extend a
    `PromptCache` (one prompt only).
    """
    config = model.config
    eos = s.eos_id if s.eos_id is not None else config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    start = config.bos_token_id if config.bos_token_id is not None else next(iter(eos_ids), None)
    prompts = _fit_prompts([list(p) for p in prompts], s, config.block_size, start)
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
                    toks[row] = next(iter(eos_ids))
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


def generate_ids(model, prompts: Sequence[Sequence[int]], **sampling) -> list[list[int]]:
    """New token ids for each prompt (EOS excluded), greedy unless temperature > 0."""
    s = sampling.pop("sampling", None) or Sampling(**sampling)
    eos = s.eos_id if s.eos_id is not None else model.config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    out: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for toks in generate_tokens(model, prompts, s):
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


class _TextRow:
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


def _stream(model, tokenizer, prompts, s: Sampling, eos_ids: set[int],
            cache: PromptCache | None = None) -> Iterator[tuple[int, str]]:
    rows = [_TextRow(tokenizer, s.stop) for _ in prompts]
    for toks in generate_tokens(model, prompts, s, cache):
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
    if s.eos_id is None:
        ids = [i for i in (tokenizer.eos_id, model.config.eos_token_id) if i is not None]
        s.eos_id = ids[0] if ids else None
    eos_ids = {s.eos_id} if isinstance(s.eos_id, int) else set(s.eos_id or [])
    single = isinstance(prompt, str)
    texts = [prompt] if single else list(prompt)
    if not texts:
        raise GptlabError("no prompts given")
    prompts = [tokenizer.encode(t) for t in texts]
    if stream:
        if not single:
            raise GptlabError("stream=True takes a single prompt")
        return (piece for _, piece in _stream(model, tokenizer, prompts, s, eos_ids, cache))
    outs = [""] * len(texts)
    for i, piece in _stream(model, tokenizer, prompts, s, eos_ids, cache):
        outs[i] += piece
    return outs[0] if single else outs


# ---------------------------------------------------------------------------------------------------------
# CLI


@command("generate")
def generate_command(
    model: str,
    prompt: list[str] | None = None,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    stop: list[str] | None = None,
    seed: int | None = 1337,
    num_samples: int = 1,
    stream: bool = False,
    echo: bool = True,
    truncate: bool = False,
    dtype: str | None = None,
    device: str = "cpu",
) -> int:
    """Generate text from a model dir (or hub id).

    Prints the prompt followed by the continuation. Sampling defaults to temperature 0.8, top-k 50 and a
    fixed seed, so a run is reproducible; --temperature 0 is greedy.

    Args:
        model: HF-format model directory (config.json, model.safetensors, tokenizer) or hub id.
        prompt: one or more prompts (several are generated as one batch); "-" reads stdin.
        max_new_tokens: tokens to generate after the prompt.
        temperature: softmax temperature; 0 means greedy.
        top_k: sample only among the k most likely tokens.
        top_p: nucleus sampling: the smallest set of tokens with probability >= p.
        repetition_penalty: >1 discourages tokens already in the text.
        no_repeat_ngram_size: never repeat an n-gram of this size.
        stop: stop strings; generation of a row ends where one appears.
        seed: random seed for sampling (reproducible output).
        num_samples: samples per prompt.
        stream: print tokens as they are generated (one prompt, one sample).
        echo: print the prompt before its continuation.
        truncate: keep only the last prompt tokens that fit the context instead of failing.
        dtype: float32, bfloat16 or float16 (default: the checkpoint's).
        device: cpu, cuda, mps ...
    """
    import gptlab

    prompts = prompt or [""]
    prompts = [sys.stdin.read() if p == "-" else p for p in prompts]
    if num_samples < 1:
        raise GptlabError("num_samples must be >= 1")
    m = gptlab.load(model, dtype=dtype, device=device)
    tok = gptlab.load_tokenizer(model)
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
              repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
              stop=stop or [], seed=seed, truncate=truncate)
    if stream:
        if len(prompts) > 1 or num_samples > 1:
            raise GptlabError("--stream takes one prompt and one sample")
        if echo:
            print(prompts[0], end="", flush=True)
        for piece in generate(m, tok, prompts[0], stream=True, **kw):
            print(piece, end="", flush=True)
        print()
        return 0
    batch = [p for p in prompts for _ in range(num_samples)]
    outs = generate(m, tok, batch, **kw)
    for i, (p, out) in enumerate(zip(batch, outs)):
        if len(batch) > 1:
            print(f"--- sample {i + 1} ---")
        print((p if echo else "") + out)
    return 0
