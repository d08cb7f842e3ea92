"""`gptlab scale run`: a whole scaling study in one command.

1. sweep the fit budgets (gptlab/scale/sweep.py), sizes bracketing each budget's optimum;
2. repeat one run with other seeds: the seed noise of a single run's loss;
3. fit the law (approach 3, bootstrap intervals) on the sweep;
4. write the prediction for the target budget (>= 10x the largest fitted) to prediction.json, before
   the target run starts: the compute-optimal size, and the loss of the size actually trained (the
   nearest shape to N_opt) on the tokens the budget buys it, each with its 95% interval, and the recipe
   the target will train with (the sweep's: Scaling sets its batch, learning rate and warm-up);
5. train the target and report predicted against observed loss: the relative error, whether it fell in the
   95% prediction interval, and the skill against the baseline "the best loss any sweep run reached".
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from gptlab.errors import GptlabError
from gptlab.scale import sweep as sw
from gptlab.scale.fit import fit_law, predict
from gptlab.scale.report import plot_compute, write_fit
from gptlab.scale.runs import read_runs

FIT_BUDGETS = [3e11, 1e12, 3e12]  # with the target below, about 15 minutes on 2 CPU cores
TARGET = 3e13


def run_study(out: Path, budgets: list[float] | None = None, target: float | None = None, noise_seeds: int = 3,
              sizes=None, base=None, scaling: sw.Scaling | None = sw.Scaling(), workers: int = 0,
              bootstrap: int = 200, log=print) -> dict[str, Any]:
    """The study; `base` and `scaling` are the recipe of every run, the target's included (default: the sweep's
    default recipe with its scale rules); `workers`: sweep runs side by side (0: one per CPU core)."""
    budgets = sorted(budgets or FIT_BUDGETS)
    target = target or TARGET
    if target < 10 * budgets[-1]:
        raise GptlabError(f"--target {target:.3g} is less than 10x the largest fitted budget {budgets[-1]:.3g}")
    base = base or sw.default_base()
    sizes = sizes or list(sw.LADDER)
    workers = workers or sw.auto_workers(base)
    t0 = time.perf_counter()
    records = sw.sweep(base, budgets, sizes, out / "sweep", scaling=scaling, workers=workers, log=log)

    # seed noise: the best run of the middle budget, again with other seeds
    mid = budgets[len(budgets) // 2]
    at_mid = [r for r in records if r["budget"] == mid and r["seed"] == 0]
    noise = None
    if noise_seeds > 1 and at_mid:
        best = min(at_mid, key=lambda r: r["loss"])
        size = (best["layers"], best["width"], best["heads"])
        reps = sw.sweep(base, [mid], [size], out / "noise", seeds=tuple(range(1, noise_seeds)), per_budget=None,
                        scaling=scaling, workers=workers, log=log)
        losses = np.array([best["loss"]] + [r["loss"] for r in reps])
        noise = {"budget": mid, "size": sw.size_name(size), "losses": losses.tolist(),
                 "std": float(losses.std(ddof=1)), "rel_std": float(losses.std(ddof=1) / losses.mean())}

    runs = read_runs(out / "sweep" / "runs.jsonl", min_runs=6)
    fit = fit_law(runs, bootstrap=bootstrap, progress=False)
    write_fit(fit, runs, out / "fit")
    d = fit.to_dict()

    from gptlab.data.shards import ensure_prepared, read_manifest

    vocab = read_manifest(ensure_prepared(base.data, tokenizer=base.tokenizer, vocab_size=base.vocab_size,
                                          cache=base.data_cache, val_fraction=base.val_fraction, quiet=True))["vocab_size"]
    optimal = predict(d, flops=target)
    size = sw.nearest_size(optimal["params"], base, vocab)
    n = sw.model_params(base, size, vocab)
    # the tokens the run will train on, with the recipe it will train with: the whole steps the budget buys at
    # its FLOPs per token (attention included, as the sweep counted them), not C / 6N
    run = sw.run_config(base, size, target, 0, out / "target", vocab, scaling)
    at_size = predict(d, params=n, tokens=sw.tokens_bought(run, vocab))
    prediction = {"target_flops": target, "compute_optimal": optimal, "trained_size": sw.size_name(size),
                  "heads": size[2], "predicted": at_size, "fit_budgets": budgets,
                  "recipe": {"batch_size": run.batch_size, "lr": run.lr, "min_lr": run.min_lr,
                             "warmup_steps": run.warmup_steps, "optimizer": run.optimizer},
                  "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "before_target_run": True}
    if sw.run_name(target, size, 0) in sw.finished_runs(out / "target"):
        # a resumed study whose target has already trained: the prediction that counts is the one on disk,
        # written before that run; a new one written now would not be a prediction
        prediction = _kept_prediction(out / "prediction.json", target, size)
        at_size = prediction["predicted"]
        log(f"the target run has finished: kept prediction.json, written at {prediction['written_at']} before it")
    else:
        (out / "prediction.json").write_text(json.dumps(prediction, indent=2) + "\n")
        log(f"prediction for C={target:.3g}: {sw.size_name(size)} (N={n / 1e6:.3f}M) on {at_size['tokens']:,.0f} "
            f"tokens -> loss {at_size['loss']:.4f} (95%: {at_size['prediction_interval'][0]:.4f} .. "
            f"{at_size['prediction_interval'][1]:.4f}); written to prediction.json before the run")

    target_runs = sw.sweep(base, [target], [size], out / "target", per_budget=None, scaling=scaling, log=log)
    observed = target_runs[0]
    lo, hi = at_size["prediction_interval"]
    baseline = float(runs.loss.min())  # "the best loss seen so far"
    err = at_size["loss"] - observed["loss"]
    result = {
        "target_flops": target, "size": sw.size_name(size), "params": n, "tokens": observed["tokens"],
        "flops": observed["flops"], "predicted": at_size["loss"], "interval": [lo, hi], "observed": observed["loss"],
        "error": err, "relative_error": err / observed["loss"], "inside_95": bool(lo <= observed["loss"] <= hi),
        "baseline_best_seen": baseline, "baseline_error": baseline - observed["loss"],
        "skill": 1 - abs(err) / abs(baseline - observed["loss"]) if baseline != observed["loss"] else None,
        "compute_ratio": target / budgets[-1], "seed_noise": noise, "sweep_runs": len(runs),
        "fit": {k: d[k] for k in ("E", "A", "B", "alpha", "beta", "a", "b")},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_compute(fit, runs, out / "prediction.png",
                 target={"flops": observed["flops"], "loss": at_size["loss"], "interval": at_size["interval"],
                         "prediction_interval": [lo, hi], "observed": observed["loss"]})
    (out / "report.md").write_text(_report(result), encoding="utf-8")
    return result


def _kept_prediction(path: Path, target: float, size: tuple[int, int, int]) -> dict[str, Any]:
    try:
        kept = json.loads(path.read_text())
        ok = (kept["target_flops"] == target and kept["trained_size"] == sw.size_name(size)
              and all(k in kept["predicted"] for k in ("loss", "interval", "prediction_interval")))
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise GptlabError(f"{path.parent / 'target'} holds a finished target run but {path} is missing or is not "
                          f"its prediction ({sw.size_name(size)} at {target:.3g} FLOPs): remove "
                          f"{path.parent / 'target'} to predict and train the target again")
    return kept


def _report(r: dict[str, Any]) -> str:
    noise = r["seed_noise"]
    lines = [
        "# Scaling study: a prediction, then the run", "",
        f"Fitted on {r['sweep_runs']} runs; the target is {r['compute_ratio']:.0f}x the largest fitted budget.", "",
        "| | |", "|---|---|",
        f"| target compute | {r['flops']:.3g} FLOPs ({r['size']}, N = {r['params']:,}, {r['tokens']:,} tokens) |",
        f"| predicted loss | {r['predicted']:.4f} (95% prediction interval {r['interval'][0]:.4f} .. {r['interval'][1]:.4f}) |",
        f"| observed loss | {r['observed']:.4f} |",
        f"| error | {r['error']:+.4f} ({100 * r['relative_error']:+.2f}% of the observed loss) |",
        f"| inside the 95% interval | {'yes' if r['inside_95'] else 'no'} |",
        f"| baseline: best loss seen | {r['baseline_best_seen']:.4f} (error {r['baseline_error']:+.4f}) |",
        f"| skill vs the baseline | {r['skill']:.3f} |" if r["skill"] is not None else "| skill | - |",
        f"| seed noise | {noise['std']:.4f} ({100 * noise['rel_std']:.2f}%) over {len(noise['losses'])} seeds of "
        f"{noise['size']} at {noise['budget']:.3g} |" if noise else "| seed noise | not measured |",
        f"| wall time of this command | {r['wall_s'] / 60:.1f} min (a resumed study counts only what it trained) |",
        "",
        f"Law: L = {r['fit']['E']:.4f} + {r['fit']['A']:.4g} / N^{r['fit']['alpha']:.4f} + {r['fit']['B']:.4g} / "
        f"D^{r['fit']['beta']:.4f}; N_opt ~ C^{r['fit']['a']:.3f}.", "",
        "Files: prediction.json (written before the target run), result.json, prediction.png, fit/ (the law, its "
        "plots), sweep/ and target/ (the runs, runs.jsonl).", "",
    ]
    return "\n".join(lines)
