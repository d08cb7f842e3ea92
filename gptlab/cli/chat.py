"""`gptlab chat`: a streaming terminal chat through the model's chat template (gptlab.infer.chat.Chat)."""

from __future__ import annotations

import json
import sys
from typing import Any, Literal

from gptlab.cli import command
from gptlab.errors import GptlabError
from gptlab.formats import hf
from gptlab.infer.chat import Chat, require_template
from gptlab.tokenizer import load_tokenizer


def _template_args(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise GptlabError(f"template argument {pair!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(value)  # enable_thinking=false -> False
        except json.JSONDecodeError:
            out[key] = value
    return out


def _read(interactive: bool) -> str | None:
    """One line of user input; None at end of input."""
    if interactive:
        try:
            return input(">>> ")
        except EOFError:
            print()
            return None
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\n")


@command("chat")
def chat(
    model: str,
    system: str | None = None,
    plain: bool = False,
    template_arg: list[str] | None = None,
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    top_k: int | None = 50,
    top_p: float | None = 0.9,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    dtype: str | None = None,
    quantize: Literal["int8", "int4"] | None = None,
    device: str = "cpu",
) -> int:
    """Chat with a model in the terminal, streaming its replies.

    One line per message; /reset starts a new conversation, /exit (or end of input, Ctrl-D) ends it.
    Ctrl-C stops a reply. Reads stdin line by line when it is not a terminal, so a conversation can be piped.

    Args:
        model: HF-format model directory or hub id; its tokenizer needs a chat template unless --plain.
        system: a system message that opens every conversation.
        plain: use a plain "User: / Assistant:" transcript instead of the tokenizer's chat template.
        template_arg: extra KEY=VALUE variables for the chat template (e.g. enable_thinking=false for Qwen3).
        max_new_tokens: longest reply in tokens.
        temperature: softmax temperature; 0 means greedy.
        top_k: sample only among the k most likely tokens.
        top_p: nucleus sampling: the smallest set of tokens with probability >= p.
        repetition_penalty: >1 discourages tokens already in the text.
        seed: random seed for sampling (each reply uses it afresh).
        dtype: float32, bfloat16 or float16 (default: the checkpoint's).
        quantize: int8 or int4: integer weights, faster CPU decode (default: none).
        device: cpu, cuda, mps ...
    """
    args = _template_args(template_arg or [])
    tok = load_tokenizer(model)
    if not plain:
        require_template(tok)  # fail before loading the weights
    from gptlab.infer.sampling import Sampling

    Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
             repetition_penalty=repetition_penalty, seed=seed)  # bad values fail before the weights load
    m = hf.load(model, dtype=dtype, device=device, quantize=quantize)
    conversation = Chat(m, tok, system=system, plain=plain, template_args=args, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                        seed=seed)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(f"chatting with {model}: /reset starts over, /exit or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            text = _read(interactive)
        except KeyboardInterrupt:
            print()
            return 0
        if text is None or text.strip() in ("/exit", "/quit"):
            return 0
        if not text.strip():
            continue
        if text.strip() == "/reset":
            conversation.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        try:
            for piece in conversation.send(text):
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        except GptlabError as e:  # e.g. a message too long for the context: report it and keep chatting
            print(f"error: {e}", file=sys.stderr)
            continue
        print(flush=True)
