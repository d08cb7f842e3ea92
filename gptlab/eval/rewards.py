"""Verifiable rewards: a score per completion, for rejection sampling (`gptlab sample --verify`) and RL.

    numeric   1 when every number of the row's `answer` appears in the completion with the same value (the
              strict matcher of `gptlab eval --task qa`, eval/numbers.py), else 0
    exact     1 when the completion equals the row's `answer` after the QA scorer's normalisation, else 0
    format    1 when the completion is "<think>...</think>" followed by a non-empty answer, else 0
    module:function
              a user function `fn(prompts, completions, **fields) -> list[float | None]`, one value per
              completion (None: no verdict); `fields` are the rows' other fields as lists

Reasoning in <think>...</think> is dropped before numeric and exact matching. A function that raises or
returns the wrong number of values is one error naming it, never broadcast.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from typing import Any

from gptlab.errors import GptlabError
from gptlab.eval.numbers import extract_numbers, numbers_match
from gptlab.eval.qa import strip_think, tokens

BUILTIN = ("numeric", "exact", "format")
_FORMAT = re.compile(r"\s*<think>.*?</think>\s*\S", re.S)

RewardFn = Callable[..., list]


def _answers(fields: dict[str, list], name: str) -> list[str]:
    answers = fields.get("answer")
    if answers is None or any(not isinstance(a, (str, int, float)) or isinstance(a, bool) for a in answers):
        raise GptlabError(f"--verify {name} needs an 'answer' field (text or a number) in every row")
    return [str(a) for a in answers]


def numeric(prompts: list, completions: list[str], **fields) -> list[float | None]:
    answers = _answers(fields, "numeric")
    return [float(bool(extract_numbers(a)) and numbers_match(a, strip_think(c))) for a, c in zip(answers, completions)]


def exact(prompts: list, completions: list[str], **fields) -> list[float | None]:
    answers = _answers(fields, "exact")
    return [float(tokens(strip_think(c)) == tokens(a)) for a, c in zip(answers, completions)]


def format_reward(prompts: list, completions: list[str], **fields) -> list[float | None]:
    return [float(bool(_FORMAT.match(c))) for c in completions]


def load_reward(spec: str) -> tuple[str, RewardFn]:
    """(name, function) of a built-in reward or a `module:function` the user wrote."""
    if spec in BUILTIN:
        return spec, {"numeric": numeric, "exact": exact, "format": format_reward}[spec]
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise GptlabError(f"a reward is {', '.join(BUILTIN)} or module:function, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise GptlabError(f"cannot import {module!r} for the reward {spec}: {e}") from None
    except AttributeError:
        raise GptlabError(f"module {module!r} has no function {name!r} (reward {spec})") from None
    if not callable(fn):
        raise GptlabError(f"reward {spec} is not a function")
    return spec, fn


def score(name: str, fn: RewardFn, prompts: list, completions: list[str], rows: list[dict[str, Any]]) -> list[float | None]:
    """fn's values for the completions, checked: one per completion, each a finite number or None."""
    fields = {k: [r.get(k) for r in rows] for k in sorted({k for r in rows for k in r} - {"prompt"})}
    try:
        values = fn(prompts, completions, **fields)
    except GptlabError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's function: its error, named, not a traceback of ours
        raise GptlabError(f"reward {name} raised {type(e).__name__}: {e}") from None
    if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise GptlabError(f"reward {name} returned {got} values for {len(completions)} completions "
                          "(one float or None per completion; a single value is never broadcast)")
    out = []
    for i, v in enumerate(values):
        if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v)):  # True / False: 1 / 0
            raise GptlabError(f"reward {name} returned {v!r} for completion {i} (a finite number or None)")
        out.append(None if v is None else float(v))
    return out
