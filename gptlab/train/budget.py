"""Time budgets (`--time-budget 4m`): the run measures its step rate, then sets max_steps so that it ends,
evaluated and saved, when the budget is spent.

The first `PROBE` steps run with the learning rate at its warm-up or peak value; their median time gives the
seconds per step and a first max_steps, refined at 15%, 35%, 60% and 85% of the budget from the recent
steps (early steps run slower). An evaluation is estimated as eval_batches forward passes at a third of a
training micro-batch's time each (a forward is about a third of forward + backward), a checkpoint from the
size of the weights. The chosen max_steps is written into the checkpoint's config, so a resumed run keeps
the schedule it started with.
"""

from __future__ import annotations

import dataclasses
import re
import time

from gptlab.errors import GptlabError

PROBE = 10  # steps measured before the schedule is set
UNSET = 10**9  # max_steps while a budget still measures: lr holds its peak, the loop does not end
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(h|m|s)?")


def parse_duration(text: str) -> float:
    """Seconds in "240", "90s", "4m", "1.5h" or "1h30m"; a GptlabError for anything else."""
    s = text.strip().lower().replace(" ", "")
    pos, total = 0, 0.0
    while pos < len(s):
        m = _PART.match(s, pos)
        if not m or (m.group(2) is None and m.end() != len(s)):
            break
        total += float(m.group(1)) * {"h": 3600, "m": 60, "s": 1, None: 1}[m.group(2)]
        pos = m.end()
    if not s or pos != len(s) or total <= 0:
        raise GptlabError(f"--time-budget must be a duration such as 240, 90s, 4m or 1h30m, got {text!r}")
    return total


def budget_steps(budget_s: float, elapsed_s: float, step: int, step_s: float, eval_every: int, eval_s: float,
                 save_every: int, save_s: float) -> int:
    """The largest max_steps >= step whose remaining steps, evaluations (every eval_every steps, and at the
    end), checkpoints (every save_every steps, and last/ + final/ at the end) fit in what is left."""
    left = budget_s - elapsed_s - eval_s - 2 * save_s
    per_step = step_s + (eval_s / eval_every if eval_every else 0.0) + (save_s / save_every if save_every else 0.0)
    return step + int(max(0.0, left) // per_step)


class Budget:
    """A Trainer's time budget: `start` before the first step, `after_step` after each. The schedule is set after
    PROBE steps and set again at REPLAN shares of the budget from the median of the recent steps' times (early
    steps are slower, and evaluations and saves between steps would skew a mean); True when max_steps changed."""

    REPLAN = (0.15, 0.35, 0.6, 0.85)

    def __init__(self, seconds: float) -> None:
        self.seconds, self.t0 = seconds, time.perf_counter()
        self.last: float | None = None
        self.times: list[float] = []
        self.plans = 0

    @classmethod
    def start(cls, trainer, resumed: bool) -> "Budget | None":
        """None without a budget, or for a resumed run, which keeps the max_steps its checkpoint chose."""
        cfg = trainer.config
        if not cfg.time_budget:
            return None
        saved = getattr(trainer, "_saved_config", {}) if resumed else {}
        if saved.get("time_budget") == cfg.time_budget and isinstance(saved.get("max_steps"), int):
            trainer.config = dataclasses.replace(cfg, max_steps=saved["max_steps"])
            return None
        trainer.config = dataclasses.replace(cfg, max_steps=UNSET)  # lr holds its peak until the schedule is set
        return cls(parse_duration(cfg.time_budget))

    def after_step(self, trainer) -> bool:
        now = time.perf_counter()
        if self.last is not None:
            self.times = (self.times + [now - self.last])[-64:]
        self.last = now
        due = self.plans == 0 and trainer.step >= PROBE + 1
        due |= 0 < self.plans <= len(self.REPLAN) and now - self.t0 >= self.REPLAN[self.plans - 1] * self.seconds
        if not due:
            return False
        step_s = sorted(self.times)[len(self.times) // 2]
        cfg = trainer.config
        eval_s = cfg.eval_batches * step_s / cfg.grad_accum / 3 if trainer.val_data is not None else 0.0
        save_s = 0.05 + 12 * sum(p.numel() for p in trainer.params) / 1e9  # weights + AdamW moments, ~1 GB/s
        steps = budget_steps(self.seconds, now - self.t0, trainer.step, step_s, cfg.eval_every, eval_s,
                             cfg.save_every or cfg.eval_every, save_s)
        self.plans += 1
        if steps == cfg.max_steps:
            return False
        trainer.config = dataclasses.replace(cfg, max_steps=steps)
        if self.plans == 1:
            trainer._print(None, f"time budget {cfg.time_budget}: {step_s:.3f} s per step; max_steps set to "
                                 f"{steps:,} (evaluations and saves included; refined as the run goes)")
        return True
