"""From token ids to text as they are generated: which ids end a row, and incremental decoding that emits
only complete characters and holds back what could still become a stop string."""

from __future__ import annotations

from gptlab.errors import GptlabError


def stop_ids(config, eos_id: int | list[int] | None = None, tokenizer=None) -> set[int]:
    """The ids that end a row, for every generation entry point: `eos_id` when given (Sampling.eos_id), else
    the model's own config.eos_token_id (an int, or a list as in Qwen's configs), else the tokenizer's EOS."""
    for ids in (eos_id, config.eos_token_id, None if tokenizer is None else tokenizer.eos_id):
        if ids is not None:
            return set(ids) if isinstance(ids, (list, tuple, set)) else {ids}
    return set()


def fit_prompt(prompt: list[int], max_new_tokens: int, context: int, truncate: bool, start_id: int | None,
               which: str = "prompt") -> list[int]:
    """The prompt as it will run: an empty one starts from the BOS/EOS id; one that with max_new_tokens does
    not fit the context is an error, or keeps its last tokens with `truncate`."""
    if not prompt:
        if start_id is None:
            raise GptlabError(f"{which} is empty and the model has no BOS/EOS token to start from")
        prompt = [start_id]
    room = context - max_new_tokens
    if len(prompt) > room:
        if room < 1:
            raise GptlabError(f"max_new_tokens={max_new_tokens} leaves no room for the {which} in the model's context "
                              f"of {context}; ask for at most {context - 1} new tokens")
        if not truncate:
            raise GptlabError(
                f"{which} of {len(prompt)} tokens + max_new_tokens={max_new_tokens} exceeds the model's context "
                f"of {context}; shorten the prompt, lower max_new_tokens, or pass truncate=True (--truncate) to "
                f"keep only the last {room} prompt tokens"
            )
        prompt = prompt[len(prompt) - room:]
    return list(prompt)


class TextRow:
    """Incremental decoding of one sequence: complete characters only, stop strings cut and held back.

    Decodes a sliding window of ids (as transformers' and vLLM's detokenizers do), so each token costs the
    same however long the text already is.
    """

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tok, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # decoded so far (a stop string and what follows it cut away)
        self.emitted = 0  # characters of text already handed out
        self.finished = False
        self._prefix = self._read = 0  # ids[prefix:read] decode to the tail of text already taken

    def add(self, token: int) -> str:
        """Append a token; return the newly final text (may be empty)."""
        if self.finished:
            return ""
        self.ids.append(token)
        before = self.tok.decode(self.ids[self._prefix:self._read])
        now = self.tok.decode(self.ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):  # not in the middle of a UTF-8 character
            start = len(self.text)
            self.text += now[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            for stop in self.stop:
                cut = self.text.find(stop, max(0, start - len(stop) + 1))
                if cut != -1:
                    self.text, self.finished = self.text[:cut], True
        if self.finished:
            return self._flush(len(self.text))
        safe = len(self.text)
        for stop in self.stop:  # hold back a tail that could still become a stop string
            for n in range(min(len(stop) - 1, safe), 0, -1):
                if self.text[safe - n:safe] == stop[:n]:
                    safe -= n
                    break
        return self._flush(safe)

    def _flush(self, upto: int) -> str:
        piece = self.text[self.emitted:upto]
        self.emitted = max(self.emitted, upto)
        return piece

    def rest(self) -> str:
        """What is held back, at the end of the sequence (an unfinished character decodes as U+FFFD)."""
        if not self.finished and self._read < len(self.ids):
            self.text += self.tok.decode(self.ids[self._prefix:])[len(self.tok.decode(self.ids[self._prefix:self._read])):]
            self._read = len(self.ids)
        return self._flush(len(self.text))
