"""Time budgets: the run sets max_steps from its measured step rate and ends, evaluated and saved, on time."""

from __future__ import annotations

import json
import time

import pytest

from gptlab.errors import GptlabError
from gptlab.train.budget import budget_steps, parse_duration
from tests.train.test_train import tiny_model


def make_trainer(data, out, **kw):
    import torch

    from gptlab.data.shards import TokenWindows, read_manifest
    from gptlab.train.loop import LoopConfig, Trainer

    cfg = LoopConfig(**{**dict(out_dir=str(out), batch_size=4, warmup_steps=2, lr=3e-3, eval_batches=2, log_every=1,
                               precision="fp32", quiet=True, seed=0), **kw})
    vocab = read_manifest(data)["vocab_size"]
    return Trainer(tiny_model(vocab), TokenWindows(data, "train", 32, 4, seed=0),
                   TokenWindows(data, "val", 32, 4, shuffle=False), cfg, device=torch.device("cpu"))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("text,seconds", [("240", 240), ("90s", 90), ("4m", 240), ("1.5h", 5400), ("1h30m", 5400),
                                          (" 2m 30s ", 150)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "4 minutes", "-3m", "0", "m", "3x"])
def test_bad_durations(text):
    with pytest.raises(GptlabError, match="--time-budget must be a duration"):
        parse_duration(text)


def test_steps_leave_room_for_evaluations_and_saves():
    # 100 s left after 10 s: at 0.1 s a step, an eval of 1 s every 100 steps, saves of 0.5 s every 100 steps
    n = budget_steps(110, 10, 10, 0.1, 100, 1.0, 100, 0.5)
    assert n == 10 + int((100 - 1.0 - 1.0) // (0.1 + 0.01 + 0.005))
    assert budget_steps(5, 10, 10, 0.1, 0, 0.0, 0, 0.0) == 10  # already over: stop now


def test_a_small_budget_ends_within_5_percent(tmp_path, pydocs):
    trainer = make_trainer(pydocs, tmp_path / "run", time_budget="12s", save_every=0, eval_every=100,
                           warmup_steps=10)
    t = time.perf_counter()
    trainer.fit()
    trainer.save_checkpoint("final", with_state=False)
    took = time.perf_counter() - t
    assert abs(took - 12) <= 0.6, took
    chosen = trainer.config.max_steps
    assert trainer.step == chosen > 20
    state = json.loads((tmp_path / "run" / "last" / "trainer" / "state.json").read_text())
    assert state["config"]["max_steps"] == chosen and state["config"]["time_budget"] == "12s"


def test_resume_keeps_the_schedule_it_chose(tmp_path, pydocs):
    first = make_trainer(pydocs, tmp_path / "run", time_budget="4s", save_every=0, eval_every=0, stop_at_step=15)
    first.fit()
    chosen = first.config.max_steps
    again = make_trainer(pydocs, tmp_path / "run", time_budget="4s", save_every=0, eval_every=0, resume=True)
    again.fit()
    assert again.config.max_steps == chosen and again.step == chosen
