"""`gptlab generate`: text from a model dir (or hub id), batched or streamed."""

from __future__ import annotations

import sys
from typing import Literal

from gptlab.cli import command
from gptlab.errors import GptlabError
from gptlab.limits import check
from gptlab.formats import hf
from gptlab.infer.generate import engine_for, generate
from gptlab.infer.sampling import Sampling
from gptlab.infer.speculative import load_draft
from gptlab.tokenizer import load_tokenizer


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
    json_schema: str | None = None,
    regex: str | None = None,
    choice: list[str] | None = None,
    grammar: str | None = None,
    stream: bool = False,
    echo: bool = True,
    truncate: bool = False,
    dtype: str | None = None,
    quantize: Literal["int8", "int4"] | None = None,
    draft: str | None = None,
    draft_tokens: int = 4,
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
        json_schema: a JSON Schema file; the output is JSON that validates against it.
        regex: the output matches this regular expression.
        choice: the output is exactly one of these strings.
        grammar: a Lark grammar file (llguidance's dialect); the output is a sentence of it.
        stream: print tokens as they are generated (one prompt, one sample).
        echo: print the prompt before its continuation.
        truncate: keep only the last prompt tokens that fit the context instead of failing.
        dtype: float32, bfloat16 or float16 (default: the checkpoint's).
        quantize: int8 or int4: integer weights, faster CPU decode (default: none).
        draft: a small model dir of the same tokenizer: speculative decoding (the same output distribution).
        draft_tokens: tokens the draft proposes per step (1-16).
        device: cpu, cuda, mps ...
    """
    prompts = prompt or [""]
    prompts = [sys.stdin.read() if p == "-" else p for p in prompts]
    check("num_samples", num_samples)
    if draft is not None:
        _draft_allows(draft_tokens, {"stream": stream, "repetition-penalty": repetition_penalty != 1.0,
                                     "no-repeat-ngram-size": no_repeat_ngram_size, "json-schema": json_schema,
                                     "regex": regex, "choice": choice, "grammar": grammar})
    m = hf.load(model, dtype=dtype, device=device, quantize=quantize)
    tok = load_tokenizer(model)
    d = None if draft is None else load_draft(draft, m, tok, dtype=dtype, device=device, quantize=quantize)
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
              repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
              stop=stop or [], seed=seed, truncate=truncate, constraint=_constraint(json_schema, regex, choice, grammar))
    if stream:
        if len(prompts) > 1 or num_samples > 1:
            raise GptlabError("--stream takes one prompt and one sample")
        if echo:
            print(prompts[0], end="", flush=True)
        for piece in generate(m, tok, prompts[0], stream=True, **kw):
            print(piece, end="", flush=True)
        print()
        return 0
    s = Sampling(**kw, n=num_samples)  # n samples of a prompt share its cached blocks and differ by seed
    engine = engine_for(m, tok, [max(1, len(tok.encode(p))) for p in prompts], s, d, draft_tokens)
    texts = [(p, o.text) for p, r in zip(prompts, engine.generate(prompts, s)) for o in r.outputs]
    for i, (p, out) in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1} ---")
        print((p if echo else "") + out)
    if d is not None:
        st = engine.stats()
        made, kept = st["spec_draft_tokens"], st["spec_accepted_tokens"]
        print(f"[draft: {kept}/{made} proposals accepted ({100 * kept / max(made, 1):.0f}%) in {st['spec_drafts']} "
              f"rounds; {st['generated_tokens']} tokens]", file=sys.stderr)
    return 0


def _draft_allows(draft_tokens: int, given: dict) -> None:
    """--draft with options the acceptance rule cannot honour exactly (a penalty or a constraint acts on each
    token as it is chosen; the engine would decode such a request without the draft): refused, so that --draft
    always means speculative decoding. --stream too: this command prints a draft's whole text and its
    acceptance rate (the engine and the server stream with a draft)."""
    check("draft_tokens", draft_tokens)
    what = [flag for flag, v in given.items() if v not in (None, False, 0)]
    if what:
        raise GptlabError(f"--draft speeds up whole-text sampling (temperature, top-k, top-p, stop strings); "
                          f"drop --{', --'.join(what)}")


def _constraint(json_schema: str | None, regex: str | None, choice: list[str] | None, grammar: str | None):
    """--json-schema FILE, --regex, --choice or --grammar FILE as one output constraint (None: free text)."""
    from pathlib import Path

    from gptlab.infer.structured import Constraint

    given = [f for f, v in (("--json-schema", json_schema), ("--regex", regex), ("--choice", choice),
                            ("--grammar", grammar)) if v is not None]
    if len(given) > 1:
        raise GptlabError(f"pass one output constraint at most, got {' and '.join(given)}")

    def read(path: str, flag: str) -> str:
        try:
            return Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise GptlabError(f"{flag}: cannot read {path}: {e.strerror if isinstance(e, OSError) else e}") from None

    if json_schema is not None:
        return Constraint.json_schema(read(json_schema, "--json-schema"))
    if regex is not None:
        return Constraint.regex(regex)
    if choice is not None:
        return Constraint.choice(choice)
    if grammar is not None:
        return Constraint.lark(read(grammar, "--grammar"))
    return None
