"""The one table of option constraints: ranges, finite numbers, integers, non-empty strings, distinct lists.

The command line, recipes and the Python API check options here (the training loop's and fine-tuning's
configs, sampling, evaluation), and the server's request models take their bounds from the same entries
(`Limit.field()` for pydantic), so a value is refused the same way wherever it comes from, and the error
names the option and its allowed range:

    check("top_p", 1.5)        ->  error: top-p must be a number in (0, 1], got 1.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from gptlab.errors import GptlabError


@dataclass(frozen=True)
class Limit:
    """An integer or a finite float, between low and high (either open or closed; None: unbounded)."""

    kind: type  # int or float
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    high_open: bool = False
    note: str = ""  # what special values mean, e.g. "0 = off"

    def allowed(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        if self.low is not None and self.high is not None:
            span = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            span = f"{'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            span = f"{'<' if self.high_open else '<='} {self.high:g}"
        else:
            span = ""
        return " ".join(p for p in (what, span) if p) + (f" ({self.note})" if self.note else "")

    def ok(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or not (value >= self.high if self.high_open else value > self.high)

    def field(self) -> dict[str, float]:
        """pydantic Field bounds (ge / gt / le / lt) of this limit."""
        out: dict[str, float] = {}
        if self.low is not None:
            out["gt" if self.low_open else "ge"] = self.low
        if self.high is not None:
            out["lt" if self.high_open else "le"] = self.high
        return out

    def narrowed(self, **bounds: Any) -> "Limit":
        """The same limit with tighter bounds (OpenAI's API caps temperature at 2)."""
        return replace(self, **bounds)


def _int(low: float | None = None, high: float | None = None, note: str = "") -> Limit:
    return Limit(int, low, high, note=note)


def _float(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False,
           note: str = "") -> Limit:
    return Limit(float, low, high, low_open, high_open, note)


LIMITS: dict[str, Limit] = {
    # the training loop (LoopConfig: train and finetune)
    "max_steps": _int(1), "batch_size": _int(1), "grad_accum": _int(1), "warmup_steps": _int(0),
    "eval_every": _int(0, note="0 = at the end"), "eval_batches": _int(1), "log_every": _int(1),
    "save_every": _int(0, note="0 = at evals"), "patience": _int(0, note="0 = never"),
    "stop_at_step": _int(0, note="0 = off"), "skip_nonfinite": _int(0, note="0 = stop at the first"),
    "lr": _float(0, low_open=True), "muon_lr": _float(0, low_open=True), "min_lr": _float(0),
    "weight_decay": _float(0), "eps": _float(0, low_open=True),
    "grad_clip": _float(0, note="0 = off"), "beta1": _float(0, 1, high_open=True), "beta2": _float(0, 1, high_open=True),
    # fine-tuning
    "val_fraction": _float(0, 1, high_open=True), "seq_len": _int(0, note="0 = the context length"),
    "lora_r": _int(1), "lora_alpha": _float(0, low_open=True), "lora_dropout": _float(0, 1, high_open=True),
    "lm_loss_weight": _float(0), "beta": _float(0, low_open=True), "label_smoothing": _float(0, 0.5, high_open=True),
    "jsd_beta": _float(0, 1), "on_policy": _float(0, 1), "num_generations": _int(2), "epsilon": _float(0, 1, high_open=True),
    "epsilon_high": _float(0, note="0 = epsilon"), "kl_beta": _float(0, note="0 = no reference"),
    # sampling (generate, chat, eval qa, the engine and the server)
    "max_new_tokens": _int(1), "temperature": _float(0), "top_k": _int(1), "top_p": _float(0, 1, low_open=True),
    "min_p": _float(0, 1), "repetition_penalty": _float(0, low_open=True), "presence_penalty": _float(-2, 2),
    "frequency_penalty": _float(-2, 2), "no_repeat_ngram_size": _int(0), "n": _int(1), "logprobs": _int(0, 20),
    "thinking_budget": _int(0), "draft_tokens": _int(1, 16),
    # data
    "prepare_val_fraction": _float(0, 0.5, low_open=True, high_open=True), "dedup_threshold": _float(0, 1, low_open=True),
    "num_perm": _int(16, 1024), "ngram": _int(8, note="shorter n-grams match common phrases"), "max_train_docs": _int(1),
    # serving
    "max_batch": _int(1), "max_batched_tokens": _int(1), "max_n": _int(1), "max_waiting": _int(1), "block_size": _int(1),
    "port": _int(0, 65535), "num_samples": _int(1),
    # evaluation
    "window": _int(1), "stride": _int(1), "num_fewshot": _int(0), "limit": _int(1), "bootstrap_iters": _int(0),
    "rel_tol": _float(0, 1, high_open=True),
    # QA synthesis (synth qa)
    "pairs_per_page": _int(1, 200), "numeric_share": _float(0, 1), "chunk_chars": _int(200),
    "concurrency": _int(1, 256), "max_retries": _int(0, 20), "max_answer_chars": _int(1),
    "test_fraction": _float(0, 1, high_open=True),
}


SPELLED = {"prepare_val_fraction": "val_fraction"}  # table entries for one command's own range of a shared name


def option(name: str) -> str:
    """How the command line spells a field (the name errors use): max_new_tokens -> max-new-tokens."""
    return SPELLED.get(name, name).replace("_", "-")


def check(name: str, value: Any, limit: Limit | None = None) -> None:
    """Raise a GptlabError naming the option and its allowed range unless `value` is within LIMITS[name]."""
    lim = limit or LIMITS[name]
    if not lim.ok(value):
        raise GptlabError(f"{option(name)} must be {lim.allowed()}, got {value!r}")


def check_fields(obj: Any, names: tuple[str, ...] | list[str]) -> None:
    """check() each named attribute of obj (a config dataclass) that is not None."""
    for name in names:
        value = getattr(obj, name)
        if value is not None:
            check(name, value)


def check_strings(name: str, values: list[str] | None, distinct: bool = False) -> None:
    """Each string non-empty, and (distinct) none twice."""
    if values is None:
        return
    if any(not isinstance(v, str) or not v for v in values):
        raise GptlabError(f"{option(name)} must be non-empty strings, got {values!r}")
    twice = sorted({v for v in values if values.count(v) > 1})
    if distinct and twice:
        raise GptlabError(f"{option(name)} must be distinct; {', '.join(map(repr, twice))} appears more than once")
