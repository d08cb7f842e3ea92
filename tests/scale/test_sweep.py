"""Compute budgets: a run stopped by --max-flops, the default recipe's scale rules, the held-out loss over every
validation window, the sweep (sizes bracketing each budget, resumable, runs side by side), and the whole study
on tiny budgets: the prediction written before the target run, which trains with the sweep's recipe."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from gptlab.errors import GptlabError
from gptlab.models import stats
from gptlab.scale import sweep as sw
from gptlab.scale.runs import read_runs
from gptlab.train.pretrain import PretrainModel, TrainConfig, run_pretraining
from tests.train.conftest import pydocs  # noqa: F401  (the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def _base(data, tmp_path) -> TrainConfig:
    return TrainConfig(data=str(data), model=PretrainModel(context_length=32), batch_size=4, warmup_steps=2,
                       eval_batches=2, precision="fp32", quiet=True, sample_tokens=0, out_dir=str(tmp_path / "run"))


def test_a_compute_budget_sets_the_steps(tmp_path, pydocs):  # noqa: F811
    base = _base(pydocs, tmp_path)
    cfg = TrainConfig(**{**base.__dict__, "model": base.model.replace(n_layer=1, n_embd=32, n_head=2, n_kv_head=None,
                                                                    head_dim=None, intermediate_size=None),
                         "max_flops": 3e9, "eval_every": 0})
    result = run_pretraining(cfg)
    assert result["tokens"] == sw.tokens_bought(cfg, 512)  # what the study predicts for, before the run
    fpt = result["flops_per_token"]
    per_step = fpt * 4 * 32
    assert result["flops"] <= 3e9 < result["flops"] + per_step  # the whole steps the budget buys
    assert result["tokens"] == result["flops"] / fpt
    counts = stats.count_params(result_config := cfg.model.replace(vocab_size=512))
    assert result["params"] == counts["non_embedding"] + counts["head"] and result_config.n_layer == 1
    with pytest.raises(GptlabError, match="buys no step"):
        run_pretraining(TrainConfig(**{**cfg.__dict__, "max_flops": 1e3, "out_dir": str(tmp_path / "r2")}))


def test_sizes_bracket_the_budget():
    params = {s: n for s, n in zip(sw.LADDER, [1e4 * 2 ** i for i in range(len(sw.LADDER))])}
    chosen = sw.bracket(1e12, sw.LADDER, params, per_budget=5)
    ratios = [1e12 / (6 * params[s] ** 2) for s in chosen]
    assert len(chosen) == 5 and min(ratios) < sw.CENTRE < max(ratios)
    assert all(sw.RATIO[0] <= r <= sw.RATIO[1] for r in ratios)
    assert sw.parse_sizes("2x64,4x128") == [(2, 64, 2), (4, 128, 4)]
    for bad, says in (("2x", "LAYERSxWIDTH"), ("0x64", "at least 1 layer")):
        with pytest.raises(GptlabError, match=says):
            sw.parse_sizes(bad)
    with pytest.raises(GptlabError, match="positive"):
        sw.parse_budgets("1e9,-3")


def test_scaling_sets_batch_lr_and_warmup_by_scale(tmp_path, pydocs):  # noqa: F811
    rule = sw.Scaling()
    assert [rule.rows(c) for c in (1e12, 8e12, 1e9)] == [8, 16, 2]  # C^(1/3), at least 2 rows
    assert rule.lr(8) == rule.lr_max and rule.lr(100) == pytest.approx(rule.lr_width / 100)
    base = _base(pydocs, tmp_path)
    size = (1, 64, 2)
    cfg = sw.run_config(base, size, 1e11, 3, tmp_path / "r", 512, rule)
    per_step = 32 * cfg.batch_size
    steps = sw.tokens_bought(cfg, 512) // per_step
    n = sw.model_params(base, size, 512)
    assert (cfg.batch_size, cfg.lr, cfg.min_lr, cfg.seed) == (rule.rows(1e11), rule.lr(64), rule.lr(64) / 10, 3)
    assert cfg.warmup_steps == min(round(n / per_step), steps // 5)  # N tokens, at most a fifth of the run
    assert sw.run_config(base, size, 1e14, 0, tmp_path / "r", 512, rule).warmup_steps == round(
        n / (32 * rule.rows(1e14)))
    kept = sw.run_config(base, size, 1e11, 3, tmp_path / "r", 512, None)  # a user's recipe: its own settings
    assert (kept.batch_size, kept.lr, kept.warmup_steps) == (base.batch_size, base.lr, base.warmup_steps)


def test_heldout_loss_is_every_validation_window(tmp_path, pydocs):  # noqa: F811
    from gptlab.data.shards import TokenWindows
    from gptlab.formats import hf
    from gptlab.models.model import GPT

    torch.manual_seed(0)
    model = GPT(_base(pydocs, tmp_path).model.replace(n_layer=1, n_embd=32, n_head=2, vocab_size=512,
                                                      n_kv_head=None, head_dim=None, intermediate_size=None))
    hf.save(model, tmp_path / "m")
    val = TokenWindows(pydocs, "val", 32, 1, shuffle=False)
    windows = [val.batch(i) for i in range(len(val))]
    assert len(windows) == (val.n_tokens - 1) // 32
    with torch.no_grad():
        logits = model(torch.cat([w["input_ids"] for w in windows]))  # (W, 32, V)
        want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.cat([w["labels"] for w in windows]).flatten())
    for rows in (3, 64):  # any chunking: the same windows, the same mean
        assert sw.heldout_loss(tmp_path / "m", pydocs, 32, rows=rows) == pytest.approx(float(want), rel=1e-5)


def test_sweep_records_runs_side_by_side_and_resumes(tmp_path, pydocs, monkeypatch):  # noqa: F811
    base = _base(pydocs, tmp_path)
    sizes = [(1, 16, 1), (1, 64, 2)]  # 1x64 trains on too few tokens per parameter at these budgets: skipped
    lines = []
    records = sw.sweep(base, [1e9, 2e9], sizes, tmp_path / "sw", per_budget=3, workers=2, log=lines.append)
    runs = read_runs(tmp_path / "sw" / "runs.jsonl")
    assert len(runs) == len(records) == 2 and {r["width"] for r in records} == {16}
    assert [r["budget"] for r in records] == [1e9, 2e9]  # plan order, whichever finished first
    for r in records:
        assert r["flops"] <= r["budget"] and r["loss"] > 0 and (tmp_path / "sw" / "runs" / r["name"] / "final").is_dir()
    assert sorted(line.split("]")[0] for line in lines if line.startswith("[")) == ["[1/2", "[2/2"]
    # a worker process trains exactly what this process would
    cfg = sw.run_config(dataclasses.replace(base, data=str(pydocs)), (1, 16, 1), 1e9, 0, tmp_path / "here", 512)
    assert sw.train_run(cfg)["loss"] == pytest.approx(records[0]["loss"], rel=1e-5)

    import gptlab.train.pretrain as pre

    monkeypatch.setattr(pre, "run_pretraining", lambda cfg: pytest.fail("a finished run was trained again"))
    again = sw.sweep(base, [1e9, 2e9], sizes, tmp_path / "sw", per_budget=3, workers=2, log=lines.append)
    assert [r["name"] for r in again] == [r["name"] for r in records]
    assert len((tmp_path / "sw" / "runs.jsonl").read_text().splitlines()) == len(records)


def test_study_predicts_before_the_target_runs_with_the_same_recipe(tmp_path, pydocs, monkeypatch):  # noqa: F811
    from gptlab.scale import study

    base = dataclasses.replace(_base(pydocs, tmp_path), eval_batches=1)
    rule = sw.Scaling(rows_at_1e12=160.0)  # 16 rows at 1e9 FLOPs: ~100 steps a run, fast
    trained = []
    real = sw.train_run

    def train(cfg, threads=0):
        if cfg.max_flops == 2e10:  # the target: its prediction is already on disk
            prediction = json.loads((tmp_path / "st" / "prediction.json").read_text())
            trained.append((prediction, cfg))
        return real(cfg, threads)

    monkeypatch.setattr(sw, "train_run", train)
    sizes = [(1, w, 1) for w in (8, 12, 16, 24)]
    result = study.run_study(tmp_path / "st", [5e8, 1e9, 2e9], 2e10, noise_seeds=2, sizes=sizes, base=base,
                             scaling=rule, workers=1, bootstrap=10, log=lambda m: None)
    [(prediction, cfg)] = trained
    assert prediction["before_target_run"] and prediction["predicted"]["loss"] == result["predicted"]
    assert prediction["recipe"] == {"batch_size": rule.rows(2e10), "lr": rule.lr(cfg.model.n_embd),
                                    "min_lr": rule.lr(cfg.model.n_embd) / 10, "warmup_steps": cfg.warmup_steps,
                                    "optimizer": base.optimizer}
    assert (cfg.batch_size, cfg.lr) == (rule.rows(2e10), rule.lr(cfg.model.n_embd))
    assert prediction["predicted"]["tokens"] == result["tokens"]  # predicted for the tokens the run trained on
    assert result["relative_error"] == pytest.approx((result["predicted"] - result["observed"]) / result["observed"])
    assert result["inside_95"] == (result["interval"][0] <= result["observed"] <= result["interval"][1])
    assert len(result["seed_noise"]["losses"]) == 2 and math.isfinite(result["seed_noise"]["rel_std"])
    assert (tmp_path / "st" / "report.md").read_text().count("| observed loss |") == 1
    assert (tmp_path / "st" / "prediction.png").read_bytes()[:4] == b"\x89PNG"

    # resumed after the target trained: the prediction written before that run is kept, never rewritten
    before = (tmp_path / "st" / "prediction.json").read_text()
    monkeypatch.setattr(sw, "train_run", lambda cfg, threads=0: pytest.fail("a finished run was trained again"))
    again = study.run_study(tmp_path / "st", [5e8, 1e9, 2e9], 2e10, noise_seeds=2, sizes=sizes, base=base,
                            scaling=rule, workers=1, bootstrap=10, log=lambda m: None)
    assert (tmp_path / "st" / "prediction.json").read_text() == before
    assert (again["predicted"], again["observed"]) == (result["predicted"], result["observed"])
    (tmp_path / "st" / "prediction.json").write_text("{}")
    with pytest.raises(GptlabError, match="is not its prediction"):
        study.run_study(tmp_path / "st", [5e8, 1e9, 2e9], 2e10, noise_seeds=2, sizes=sizes, base=base,
                        scaling=rule, workers=1, bootstrap=10, log=lambda m: None)
