"""Structured replies over the API: a request's response_format / structured_outputs as one engine
Constraint, and tool calling in the Qwen2.5 / Qwen3 format.

Tools go to the model through its chat template (`tools=`: Qwen's templates list the signatures in the system
turn); the model answers with `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks, which
become OpenAI `tool_calls` (whole, and as stream deltas once a block closes). tool_choice "auto" leaves the
choice to the model; "required" or a named function constrains the reply to one such block whose JSON
matches a tool's parameter schema, so the call always parses and validates; "none" leaves the tools out.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from gptlab.errors import GptlabError
from gptlab.infer.structured import JSON_OPTIONS, Constraint, check_schema
from gptlab.serve.protocol import ApiError, NamedToolChoice, Tool

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)


def _constraint(kind: str, value: Any, param: str) -> Constraint:
    try:
        if kind == "json_schema":
            return Constraint.json_schema(value)
        if kind == "json_object":
            return Constraint.json_object()
        if kind == "regex":
            return Constraint.regex(value)
        if kind == "choice":
            return Constraint.choice(value)
        return Constraint.lark(value)
    except GptlabError as e:
        raise ApiError(400, str(e), param) from None


def request_constraint(req) -> Constraint | None:
    """The one output constraint a completion or chat request asks for (None: free text)."""
    asked: list[tuple[str, Constraint]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        asked.append(("response_format", _constraint("json_object", None, "response_format")))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise ApiError(400, "response_format of type json_schema needs json_schema.schema", "response_format")
        asked.append(("response_format", _constraint("json_schema", rf.json_schema.schema_, "response_format")))
    so = req.structured_outputs
    fields = [] if so is None else [("json_schema", so.json_), ("regex", so.regex), ("choice", so.choice),
                                    ("grammar", so.grammar), ("json_object", so.json_object or None)]
    fields += [("json_schema", req.guided_json), ("regex", req.guided_regex), ("choice", req.guided_choice),
               ("grammar", req.guided_grammar)]
    for kind, value in fields:
        if value is not None:
            param = "structured_outputs" if so is not None else f"guided_{kind.split('_')[0]}"
            asked.append((param, _constraint(kind, value, param)))
    if len(asked) > 1:
        raise ApiError(400, f"a request takes one output constraint; this one has {len(asked)} "
                            f"({', '.join(p for p, _ in asked)})", asked[1][0])
    return asked[0][1] if asked else None


# ---------------------------------------------------------------------------------------------------------
# tools


class Tools:
    """A chat request's tools and tool_choice, checked."""

    def __init__(self, tools: list[Tool] | None, choice, has_constraint: bool) -> None:
        self.tools = tools or []
        if choice is not None and not self.tools:
            raise ApiError(400, "tool_choice needs tools", "tool_choice")
        choice = choice or ("auto" if self.tools else "none")
        names = [t.function.name for t in self.tools]
        if len(set(names)) != len(names):
            raise ApiError(400, "tool names must be unique", "tools")
        for t in self.tools:
            try:
                check_schema(t.function.parameters or {"type": "object"})
            except GptlabError as e:
                raise ApiError(400, f"tool {t.function.name}: {e}", "tools") from None
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in names:
                raise ApiError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools "
                                    f"({', '.join(names)})", "tool_choice")
            self.forced = [t for t in self.tools if t.function.name == choice.function.name]
        else:
            self.forced = self.tools if choice == "required" else []
        self.active = bool(self.tools) and choice != "none"
        if self.forced and has_constraint:
            raise ApiError(400, "tool_choice required or a named function constrains the reply already; drop "
                                "response_format / structured_outputs", "tool_choice")

    def for_template(self) -> list[dict] | None:
        """The tools as chat templates take them (OpenAI's shape), or None when the model is not to see them."""
        if not self.active:
            return None
        return [{"type": "function", "function": t.function.model_dump(exclude_none=True)} for t in self.tools]

    def constraint(self, tokenizer) -> Constraint | None:
        """For required / a named function: exactly one call block whose JSON is {"name", "arguments"} of one
        of the forced tools, arguments matching its parameters."""
        if not self.forced:
            return None
        options = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                     "arguments": t.function.parameters or {"type": "object"}},
                    "required": ["name", "arguments"], "additionalProperties": False} for t in self.forced]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        schema = {**schema, "x-guidance": JSON_OPTIONS}  # compact, as elsewhere
        lark = f'start: {_literal(tokenizer, OPEN)} "\\n" %json {json.dumps(schema, ensure_ascii=False)} "\\n" ' \
               f'{_literal(tokenizer, CLOSE)}'
        return Constraint.lark(lark)


def _literal(tokenizer, text: str) -> str:
    """A grammar literal for text: the token itself when the vocabulary has it as one token (what the model
    learned to write; a special token matches by id only), else the text."""
    tid = tokenizer.token_id(text)
    return f"<[{tid}]>" if tid is not None else json.dumps(text)


def template_turns(messages) -> list[dict]:
    """OpenAI messages as chat templates take them: developer -> system; an assistant turn's tool_calls with
    their arguments as objects (Qwen's templates write them with tojson); a tool turn's tool_call_id."""
    turns = []
    for i, m in enumerate(messages):
        turn: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name is not None:
            turn["name"] = m.name
        if m.tool_calls:
            calls = []
            for c in m.tool_calls:
                try:
                    args = json.loads(c.function.arguments or "{}")
                except json.JSONDecodeError as e:
                    raise ApiError(400, f"messages[{i}].tool_calls: arguments of {c.function.name} are not JSON: {e}",
                                   "messages") from None
                calls.append({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}})
            turn["tool_calls"] = calls
        if m.role == "tool":
            turn["tool_call_id"] = m.tool_call_id
        turns.append(turn)
    return turns


def _call(body: str) -> dict | None:
    """An OpenAI tool call from one block's JSON, or None when it is not {"name": str, "arguments": object}."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(args, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


class CallStream:
    """One choice's answer text, split as it streams into content and tool calls: text from <tool_call> on is
    held until its block closes; a block that does not parse stays content, as does an unclosed one at the end."""

    def __init__(self) -> None:
        self._held = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        text = self._held + text
        self._held = ""
        content, calls = [], []
        while text:
            at = text.find(OPEN)
            if at == -1:
                keep = 0 if final else next((n for n in range(len(OPEN) - 1, 0, -1) if text.endswith(OPEN[:n])), 0)
                content.append(text[:len(text) - keep])
                self._held = text[len(text) - keep:]
                break
            content.append(text[:at])
            m = _BLOCK.match(text, at)
            if m is None:  # the block is still open
                if final:
                    content.append(text[at:])
                else:
                    self._held = text[at:]
                break
            call = _call(m.group(1))
            if call is None:
                content.append(m.group(0))
            else:
                calls.append(call)
            text = text[m.end():]
        return "".join(content), calls
