"""What the teacher is asked, and reading what it answers.

The prompt asks for a number of question-answer pairs about one page, a share of them numeric, in the
page's language, answers taken from the text, as JSON {"pairs": [{"question": ..., "answer": ...}]}.
`pairs_schema` is that shape as a JSON schema, sent as `response_format` to servers that enforce it
(gptlab serve, vLLM), which makes the reply exact.

`parse_pairs` reads replies the way LLMs actually write them: a ```json fence with chatter around it,
a bare list instead of the object, a trailing comma, <think> reasoning first, `q`/`a` or Chinese keys.
"""

from __future__ import annotations

import json
import math
import re

from gptlab.synth.documents import Page

def pairs_schema(n_pairs: int, max_answer_chars: int) -> dict:
    """The reply's shape as a JSON schema: at most n_pairs pairs; an answer one character over the limit is
    still cut off (and dropped as long_answer) rather than left to run on."""
    text = {"type": "string", "minLength": 1}
    return {"type": "object", "required": ["pairs"], "additionalProperties": False, "properties": {"pairs": {
        "type": "array", "minItems": 1, "maxItems": n_pairs, "items": {
            "type": "object", "required": ["question", "answer"], "additionalProperties": False,
            "properties": {"question": {**text, "maxLength": 500}, "answer": {**text, "maxLength": max_answer_chars + 1}}}}}}


_SYSTEM = {
    "en": "You write question-answer pairs for training and testing a model on a document. You reply with JSON only.",
    "zh": "你为一份文档编写问答对，用于训练和测试模型。你只用 JSON 回复。",
}
_ASK = {
    "en": ("Write {n} question-answer pairs about the text below, in English.\n"
           "- At least {k} of them must be numeric: the answer is a number, amount, percentage, limit, date or "
           "count stated in the text, with its unit.\n"
           "- Every answer must be taken from the text; copy numbers exactly as written. Keep answers short.\n"
           "- Each question must make sense on its own, without seeing the text.\n"
           'Reply with JSON only: {{"pairs": [{{"question": "...", "answer": "..."}}]}}\n\n'
           "Source: {where}\n\nText:\n{text}"),
    "zh": ("根据下面的文本编写 {n} 个问答对，使用中文。\n"
           "- 其中至少 {k} 个必须是数字类问题：答案是文本中给出的数字、金额、百分比、限额、日期或数量，并带单位。\n"
           "- 每个答案都必须来自文本，数字必须与原文完全一致。答案要简短。\n"
           "- 每个问题都要能单独看懂，不需要看到原文。\n"
           '只用 JSON 回复：{{"pairs": [{{"question": "...", "answer": "..."}}]}}\n\n'
           "来源：{where}\n\n文本：\n{text}"),
}


def numeric_count(n_pairs: int, numeric_share: float) -> int:
    return math.ceil(n_pairs * numeric_share - 1e-9)


def messages(page: Page, n_pairs: int, numeric_share: float) -> list[dict[str, str]]:
    lang = page.language if page.language in _ASK else "en"
    ask = _ASK[lang].format(n=n_pairs, k=numeric_count(n_pairs, numeric_share), where=page.ref, text=page.text)
    return [{"role": "system", "content": _SYSTEM[lang]}, {"role": "user", "content": ask}]


class ReplyError(ValueError):
    """A teacher reply with no readable pairs in it."""


_FENCE = re.compile(r"```[a-zA-Z]*\s*\n?(.*?)```", re.S)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_KEYS = {"question": ("question", "q", "问题", "问"), "answer": ("answer", "a", "答案", "答")}


def _candidates(reply: str) -> list[str]:
    text = re.sub(r"<think>.*?</think>", "", reply, flags=re.S)
    found = [m.group(1) for m in _FENCE.finditer(text)]
    for open_, close in (("{", "}"), ("[", "]")):  # the outermost bracketed span, chatter cut off
        i, j = text.find(open_), text.rfind(close)
        if 0 <= i < j:
            found.append(text[i: j + 1])
    return found


def _field(item: dict, name: str) -> str | None:
    for key in _KEYS[name]:
        v = item.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if isinstance(v, str):
            return v.strip()
    return None


def parse_pairs(reply: str) -> list[tuple[str, str]]:
    """(question, answer) pairs in a teacher's reply; ReplyError when none can be read."""
    for candidate in _candidates(reply):
        for attempt in (candidate, _TRAILING_COMMA.sub(r"\1", candidate)):
            try:
                data = json.loads(attempt, strict=False)  # raw newlines and tabs inside strings are common
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict):
                data = next((v for k, v in data.items() if k in ("pairs", "qa", "questions", "data", "问答对")
                             and isinstance(v, list)), [data] if _field(data, "question") is not None else None)
            if not isinstance(data, list):
                continue
            pairs = [(q, a) for item in data if isinstance(item, dict)
                     for q, a in [(_field(item, "question"), _field(item, "answer"))] if q is not None and a is not None]
            if pairs:
                return pairs
    raise ReplyError("no question-answer pairs in the reply: " + (reply.strip()[:120] or "(empty)"))
