"""Compute budgets: a run stopped by --max-flops, the sweep (sizes bracketing each budget, resumable), and the
study's pieces on tiny budgets."""

from __future__ import annotations

import json

import pytest

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


def test_sweep_records_runs_and_resumes(tmp_path, pydocs, monkeypatch):  # noqa: F811
    base = _base(pydocs, tmp_path)
    sizes = [(1, 16, 1), (1, 32, 2)]  # 1x32 trains on too few tokens per parameter at these budgets: skipped
    lines = []
    records = sw.sweep(base, [1e10, 2e10], sizes, tmp_path / "sw", per_budget=3, log=lines.append)
    runs = read_runs(tmp_path / "sw" / "runs.jsonl")
    assert len(runs) == len(records) == 2 and {r["layers"] for r in records} == {1}
    for r in records:
        assert r["flops"] <= r["budget"] and r["loss"] > 0 and (tmp_path / "sw" / "runs" / r["name"] / "final").is_dir()
    assert any(line.startswith("[1/") for line in lines)

    import gptlab.train.pretrain as pre

    monkeypatch.setattr(pre, "run_pretraining", lambda cfg: pytest.fail("a finished run was trained again"))
    again = sw.sweep(base, [1e10, 2e10], sizes, tmp_path / "sw", per_budget=3, log=lines.append)
    assert [r["name"] for r in again] == [r["name"] for r in records]
    assert len((tmp_path / "sw" / "runs.jsonl").read_text().splitlines()) == len(records)
    assert json.loads((tmp_path / "sw" / "runs.jsonl").read_text().splitlines()[0])["budget"] == 1e10
