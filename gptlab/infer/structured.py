"""Constrained decoding: output that always matches a JSON schema, any JSON object, a regular expression, one
of a list of choices, or a Lark grammar, through llguidance (guidance-ai's grammar engine, on PyPI).

    from gptlab.infer.structured import Constraint
    s = Sampling(max_new_tokens=200, temperature=1.0, constraint=Constraint.json_schema(schema))

`Constraint` is what a request asks for (a value, checked when made). The engine holds one `Grammars`: the
tokenizer in llguidance's form (built once) and the batched mask. Each constrained sample gets its own
`LLMatcher`; every step the matchers of the step's constrained rows write their allowed-token bitmasks in
parallel, those rows' logits outside the mask become -inf, and each sampled token is fed back. Unconstrained
rows in the same batch pay nothing.

JSON is generated compact (no whitespace between tokens, "," and ":" separators). A schema keyword that JSON
Schema does not define is refused (a misspelt "maxLenght" would otherwise constrain nothing), as is one
llguidance does not implement: the caller gets the reason, never a silently looser constraint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from gptlab.errors import GptlabError

__all__ = ["Constraint", "Grammars", "check_schema"]

# JSON Schema's keywords (draft 4 to 2020-12), as https://json-schema.org/draft/2020-12 lists them
_SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies"}
_SCHEMA_ONE = {"additionalProperties", "items", "additionalItems", "contains", "propertyNames", "not", "if", "then",
               "else", "unevaluatedItems", "unevaluatedProperties", "contentSchema"}
_SCHEMA_LISTS = {"allOf", "anyOf", "oneOf", "prefixItems", "items"}
_KEYWORDS = _SCHEMA_MAPS | _SCHEMA_ONE | _SCHEMA_LISTS | {
    "$schema", "$id", "id", "$ref", "$anchor", "$dynamicRef", "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor",
    "$vocabulary", "$comment", "type", "const", "enum", "multipleOf", "maximum", "exclusiveMaximum", "minimum",
    "exclusiveMinimum", "maxLength", "minLength", "pattern", "maxItems", "minItems", "uniqueItems", "maxContains",
    "minContains", "maxProperties", "minProperties", "required", "dependentRequired", "title", "description",
    "default", "deprecated", "readOnly", "writeOnly", "examples", "format", "contentEncoding", "contentMediaType",
    "nullable",  # OpenAPI 3.0's, which pydantic v1 and many tool schemas write
}
_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":", "lenient": False}


def check_schema(schema: Any, where: str = "") -> None:
    """Refuse what is not a JSON Schema: a non-object, or a keyword the standard does not define (`x-...`
    extensions, such as llguidance's own `x-guidance`, are allowed)."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise GptlabError(f"the JSON schema{' at ' + where if where else ''} must be an object or a boolean, "
                          f"got {type(schema).__name__}")
    for key, value in schema.items():
        at = f"{where}/{key}"
        if key not in _KEYWORDS and not key.startswith("x-"):
            raise GptlabError(f"unknown JSON Schema keyword {key!r} at {at or '/'}")
        if key in _SCHEMA_MAPS and key != "dependencies":
            if not isinstance(value, dict):
                raise GptlabError(f"{at} must be an object of schemas")
            for name, sub in value.items():
                check_schema(sub, f"{at}/{name}")
        elif key == "dependencies" and isinstance(value, dict):
            for name, sub in value.items():
                if not isinstance(sub, list):  # a list of property names, or a schema
                    check_schema(sub, f"{at}/{name}")
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            for i, sub in enumerate(value):
                check_schema(sub, f"{at}/{i}")
        elif key in _SCHEMA_ONE:
            check_schema(value, at)


@dataclass(frozen=True)
class Constraint:
    """What a generation must match. Build one with the class methods; `text` is the spec as text (the schema
    as JSON, the regex, the choices as a JSON list, the Lark grammar)."""

    kind: str
    text: str

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise GptlabError(f"constraint kind must be one of {', '.join(_KINDS)}, got {self.kind!r}")

    @classmethod
    def json_schema(cls, schema: dict | bool | str) -> Constraint:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise GptlabError(f"the JSON schema is not valid JSON: {e}") from None
        check_schema(schema)
        return cls("json_schema", json.dumps(schema, ensure_ascii=False))

    @classmethod
    def json_object(cls) -> Constraint:
        """Any JSON object (OpenAI's response_format json_object)."""
        return cls("json_object", '{"type": "object"}')

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        if not isinstance(pattern, str) or not pattern:
            raise GptlabError("a regex constraint needs a non-empty pattern")
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: list[str]) -> Constraint:
        if not isinstance(options, (list, tuple)) or not options or not all(isinstance(o, str) and o for o in options):
            raise GptlabError("a choice constraint needs a non-empty list of non-empty strings")
        return cls("choice", json.dumps(list(options), ensure_ascii=False))

    @classmethod
    def lark(cls, grammar: str) -> Constraint:
        """A Lark grammar in llguidance's syntax (`start: ...`; `%json {...}` embeds a schema)."""
        if not isinstance(grammar, str) or not grammar.strip():
            raise GptlabError("a grammar constraint needs a non-empty Lark grammar")
        return cls("grammar", grammar)

    def grammar(self) -> str:
        """This constraint as an llguidance grammar (not yet checked against a tokenizer)."""
        from llguidance import LLMatcher

        try:
            if self.kind in ("json_schema", "json_object"):
                return LLMatcher.grammar_from_json_schema(self.text, overrides=JSON_OPTIONS)
            if self.kind == "regex":
                return LLMatcher.grammar_from_regex(self.text)
            if self.kind == "choice":
                return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in json.loads(self.text)))
            return LLMatcher.grammar_from_lark(self.text)
        except ValueError as e:
            raise GptlabError(f"the {self.kind} constraint cannot be compiled: {e}") from None

    def describe(self) -> str:
        return f"{self.kind} {self.text[:60]}{'...' if len(self.text) > 60 else ''}"


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in which byte-level BPE vocabularies spell their tokens."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


def _plain_added_tokens(tokenizer_json: str) -> str:
    """tokenizer.json with its non-special added tokens (Qwen's <tool_call>, <think>...) moved into a byte-level
    BPE vocabulary as ordinary tokens. llguidance takes every added token for a special one, which text never
    matches; yet its forced-text path offers such a token where the grammar's text spells it, and then refuses
    it. As ordinary tokens they are the text they decode to, and a grammar's "<tool_call>" matches them."""
    d = json.loads(tokenizer_json)
    model = d.get("model") or {}
    byte_level = (d.get("decoder") or {}).get("type") == "ByteLevel"
    plain = [t for t in d.get("added_tokens", []) if not t.get("special", True)]
    if not plain or not byte_level or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        return tokenizer_json
    table = _byte_chars()
    for t in plain:
        model["vocab"][''.join(table[b] for b in t["content"].encode("utf-8"))] = t["id"]
    d["added_tokens"] = [t for t in d["added_tokens"] if t.get("special", True)]
    return json.dumps(d, ensure_ascii=False)


def _one_line(messages: list[str]) -> str:
    """llguidance's first error as one line: its caret lines and grammar listing left out."""
    lines = [ln.strip() for ln in (messages[0] if messages else "invalid").splitlines()]
    keep = [ln for ln in lines if ln and set(ln) - {"^", " "} and not ln.split("|")[0].strip().isdigit()]
    return "; ".join(keep)


class Grammars:
    """One engine's constrained decoding: the tokenizer as llguidance sees it, compiled grammars (cached by
    constraint), and the batched mask."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int], cache_size: int = 256) -> None:
        from llguidance import LLExecutor, LLTokenizer

        if tokenizer is None:
            raise GptlabError("constrained decoding needs the model's tokenizer")
        self.vocab = vocab_size
        # llguidance ends a grammar with one EOS id; the engine maps it onto each row's own stop ids
        self.eos = min(eos_ids) if eos_ids else tokenizer.eos_id
        if self.eos is None:
            raise GptlabError("constrained decoding needs an EOS token id (config eos_token_id or the tokenizer's)")
        n_vocab = max(vocab_size, tokenizer.vocab_size)
        try:
            self.tokenizer = LLTokenizer(_plain_added_tokens(tokenizer.backend.to_str()), n_vocab=n_vocab,
                                         eos_token=self.eos)
        except Exception as e:  # llguidance reports an unsupported tokenizer as a plain exception
            raise GptlabError(f"llguidance cannot use this tokenizer for constrained decoding: {e}") from None
        # llguidance's thread pool pays off with cores to spare; on a few, handing rows to it costs more than
        # computing them on this thread (the forward's OpenMP threads are still spinning on those cores)
        self.executor = LLExecutor() if (os.cpu_count() or 1) > 4 else None
        self._words = -(-n_vocab // 32)
        self._unpack = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1 == 1  # byte -> its 8 bits
        self._compiled: dict[Constraint, str] = {}
        self._cache_size = cache_size

    def compile(self, c: Constraint) -> str:
        """The checked llguidance grammar of c; a GptlabError with llguidance's reason when it cannot be built."""
        from llguidance import LLMatcher

        g = self._compiled.get(c)
        if g is None:
            g = c.grammar()
            is_error, messages = LLMatcher.validate_grammar_with_warnings(g, self.tokenizer)
            if is_error:
                raise GptlabError(f"the {c.kind} constraint cannot be compiled: {_one_line(messages)}")
            if len(self._compiled) >= self._cache_size:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[c] = g
        return g

    def matcher(self, c: Constraint):
        from llguidance import LLMatcher

        m = LLMatcher(self.tokenizer, self.compile(c), log_level=0)
        if m.is_error():
            raise GptlabError(f"the {c.kind} constraint cannot be compiled: {_one_line([m.get_error()])}")
        return m

    def mask(self, logits: torch.Tensor, rows: list[int], matchers: list, eos: list[set[int]]) -> None:
        """In place: logits[rows[i]] keeps only what matchers[i] allows next; a row's own stop ids are allowed
        exactly when the grammar may end there."""
        R, V = len(rows), logits.shape[-1]
        bits = torch.full((R, self._words), -1, dtype=torch.int32)
        if self.executor is not None:
            self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bits.data_ptr(),
                                                  self._words * 4, R)
        else:
            for i, m in enumerate(matchers):
                m.unsafe_compute_mask_ptr(bits.data_ptr() + i * self._words * 4, self._words * 4)
        # little-endian words: byte k of the row holds tokens 8k..8k+7, bit j token 8k+j
        allowed = self._unpack.index_select(0, bits.view(torch.uint8).view(-1).int()).view(R, -1)[:, :V]
        may_end = allowed[:, self.eos].clone()
        if all(ids == eos[0] for ids in eos):
            allowed[:, list(eos[0])] = may_end.unsqueeze(1)
        else:
            for i, ids in enumerate(eos):
                allowed[i, list(ids)] = may_end[i]
        blocked = ~allowed.to(logits.device)
        if R == logits.shape[0] and rows == list(range(R)):
            logits.masked_fill_(blocked, float("-inf"))
        else:
            index = torch.tensor(rows, device=logits.device)
            logits[index] = logits[index].masked_fill(blocked, float("-inf"))

    def advance(self, matcher, token: int) -> bool:
        """Feed the sampled token; True when the grammar is complete (nothing but an end may follow)."""
        if not matcher.consume_token(token):
            raise GptlabError(f"constrained decoding: token {token} broke the grammar ({matcher.get_error()})")
        return matcher.is_stopped()
