"""`gptlab chat MODEL`: a terminal chat that renders the conversation with the tokenizer's chat template.

Each turn renders the whole history (`Tokenizer.apply_chat_template(messages, add_generation_prompt=True)`,
the same Jinja template transformers uses) and streams the reply from `gptlab.generate.generate`. A reply
ends at the template's end-of-turn marker (found by rendering a known assistant message: "<|im_end|>" for
ChatML / Qwen) or at the tokenizer's EOS. When the history outgrows the context, the oldest exchanges go.
A `PromptCache` keeps the KV cache between turns, so each turn prefills only the tokens the history does not
already hold (the new user message, and wherever the rendering departs from what was generated).
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Iterator
from typing import Any

from gptlab.cli import command
from gptlab.errors import GptlabError
from gptlab.generate import PromptCache, generate

# opt-in transcript for models without a chat template (base models): "User: ...\nAssistant: ..."
PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
PLAIN_STOP = ["\nUser:"]  # a base model continues the transcript; its next "User:" line ends the reply

_SENTINEL = "gptlab-end-of-turn-probe"


def end_of_turn(tokenizer) -> list[str]:
    """Stop strings that end an assistant turn: what the template writes right after an assistant message."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    at = text.rfind(_SENTINEL)
    marker = text[at + len(_SENTINEL):].strip() if at != -1 else ""
    return [marker] if marker else []


def require_template(tokenizer) -> None:
    if not tokenizer.chat_template:
        raise GptlabError("this model's tokenizer has no chat template (tokenizer_config.json 'chat_template' or "
                          "chat_template.jinja); pass --plain to chat with a plain User:/Assistant: transcript")


class Chat:
    """A conversation with one model: history, rendering, and streaming replies."""

    def __init__(self, model, tokenizer, system: str | None = None, plain: bool = False,
                 template_args: dict[str, Any] | None = None, **sampling: Any) -> None:
        if plain:
            tokenizer = copy.copy(tokenizer)
            tokenizer.chat_template = PLAIN_TEMPLATE
        require_template(tokenizer)
        self.model, self.tok, self.system = model, tokenizer, system
        self.template_args = template_args or {}
        stop = PLAIN_STOP if plain else end_of_turn(tokenizer)
        self.sampling = {**sampling, "stop": [*sampling.get("stop", []), *stop]}
        self.messages: list[dict[str, str]] = []
        self.cache = PromptCache()  # each turn prefills only what the history does not already hold
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cache.reset()

    def prompt(self) -> str:
        """The rendered conversation, ending where the assistant's next reply starts."""
        return self.tok.apply_chat_template(self.messages, add_generation_prompt=True, **self.template_args)

    def _fit(self) -> str:
        """Render, dropping the oldest exchanges (never the system message or the new user turn) to fit."""
        budget = self.model.config.block_size - self.sampling.get("max_new_tokens", 64)
        while True:
            prompt = self.prompt()
            if len(self.tok.encode(prompt)) <= budget:
                return prompt
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if len(self.messages) - first <= 1:
                self.messages.pop()
                raise GptlabError(f"the message does not fit the model's context of {self.model.config.block_size} "
                                  f"tokens with max_new_tokens={self.sampling.get('max_new_tokens', 64)}")
            del self.messages[first:first + 2]  # the oldest user message and its reply

    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the reply; the reply joins the history once it is complete."""
        self.messages.append({"role": "user", "content": text})
        prompt = self._fit()
        pieces: list[str] = []
        complete = False
        try:
            for piece in generate(self.model, self.tok, prompt, stream=True, cache=self.cache, **self.sampling):
                pieces.append(piece)
                yield piece
            complete = True
        finally:
            if not complete:  # interrupted or failed: forget the unanswered user message
                self.messages.pop()
        self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})


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
        device: cpu, cuda, mps ...
    """
    import gptlab

    args = _template_args(template_arg or [])
    tok = gptlab.load_tokenizer(model)
    if not plain:
        require_template(tok)  # fail before loading the weights
    m = gptlab.load(model, dtype=dtype, device=device)
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
