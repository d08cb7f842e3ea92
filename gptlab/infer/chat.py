"""A conversation with a model (`Chat`, behind `gptlab chat`), rendered with the tokenizer's chat template.

Each turn renders the whole history (`Tokenizer.apply_chat_template(messages, add_generation_prompt=True)`,
the same Jinja template transformers uses) and streams the reply from `gptlab.infer.generate.generate`. A reply
ends at the template's end-of-turn marker (found by rendering a known assistant message: "<|im_end|>" for
ChatML / Qwen) or at the tokenizer's EOS. When the history outgrows the context, the oldest exchanges go.
A `PromptCache` keeps the KV cache between turns, so each turn prefills only the tokens the history does not
already hold (the new user message, and wherever the rendering departs from what was generated).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from gptlab.errors import GptlabError
from gptlab.infer.generate import PromptCache, generate
from gptlab.infer.sampling import Sampling

# opt-in transcript for models without a chat template (base models): "User: ...\nAssistant: ..."
TRANSCRIPT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
TRANSCRIPT_STOP = ["\nUser:"]  # a base model continues the transcript; its next "User:" line ends the reply

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
            tokenizer.chat_template = TRANSCRIPT_TEMPLATE
        require_template(tokenizer)
        self.model, self.tok, self.system = model, tokenizer, system
        self.template_args = template_args or {}
        stop = TRANSCRIPT_STOP if plain else end_of_turn(tokenizer)
        self.sampling = {**sampling, "stop": [*sampling.get("stop", []), *stop]}
        Sampling(**{k: v for k, v in self.sampling.items() if k in Sampling.__dataclass_fields__})  # bad values: now
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
        budget = self.model.config.context_length - self.sampling.get("max_new_tokens", 64)
        while True:
            prompt = self.prompt()
            if len(self.tok.encode(prompt)) <= budget:
                return prompt
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if len(self.messages) - first <= 1:
                self.messages.pop()
                raise GptlabError(f"the message does not fit the model's context of {self.model.config.context_length} "
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
