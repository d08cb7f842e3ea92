"""`gptlab scale fit` (a scaling law from runs) and `gptlab scale predict` (a bigger run, before training it)."""

from __future__ import annotations

import json
from pathlib import Path

from gptlab.cli import command
from gptlab.errors import GptlabError
from gptlab.formats.files import check_destination, read_json


@command("scale fit")
def scale_fit(runs: str, out: str = "scale-fit", bootstrap: int = 200, starts: int = 64, seed: int = 0,
              overwrite: bool = False, quiet: bool = False) -> int:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to training runs (Chinchilla's approach 3), with
    IsoFLOP parabolas (approach 2) and the compute frontier where the runs allow them.

    Writes OUT/fit.json, fit.md and compute.png, isoflops.png, residuals.png. docs/scaling.md has the
    method. Example:

      gptlab scale fit runs.csv --out fit --bootstrap 500

    Args:
        runs: a CSV or JSONL of runs: params, tokens (or flops = 6 params tokens), loss
        out: output dir (-o)
        bootstrap: resampled refits for the 95% intervals
        starts: L-BFGS runs from the best points of the starting grid
        seed: seed of the bootstrap resampling
        overwrite: write into OUT even when it holds files gptlab did not write
        quiet: no progress bar
    """
    from gptlab.limits import Limit, check
    from gptlab.scale.fit import fit_law
    from gptlab.scale.report import write_fit
    from gptlab.scale.runs import read_runs

    check("bootstrap", bootstrap, Limit(int, 0))
    check("starts", starts, Limit(int, 1, 4500))
    check_destination(out, ("fit.json",), "the fit dir", overwrite)
    data = read_runs(runs)
    fit = fit_law(data, bootstrap=bootstrap, starts=starts, seed=seed, progress=not quiet)
    paths = write_fit(fit, data, Path(out))
    d = fit.to_dict()
    print(f"L(N, D) = {d['E']:.4f} + {d['A']:.4g} / N^{d['alpha']:.4f} + {d['B']:.4g} / D^{d['beta']:.4f}  "
          f"({len(data)} runs, residual std {d['residual_std']:.4f})")
    print(f"compute-optimal: N_opt ~ C^{d['a']:.3f}, D_opt ~ C^{d['b']:.3f}"
          + (f"; IsoFLOP profiles: N_opt ~ C^{d['approach2']['a']:.3f}" if d["approach2"] else ""))
    if fit.edge:
        print(f"warning: {', '.join(fit.edge)} lie outside the starting grid's span (see fit.md)")
    print(f"wrote {paths['json']}, {paths['md'].name} and 3 plots")
    return 0


@command("scale predict")
def scale_predict(fit: str, flops: float | None = None, params: float | None = None,
                  tokens: float | None = None) -> int:
    """Predict a run from a fit: the compute-optimal size, tokens and loss at a budget, or the loss of
    a given size and token count; each with its 95% interval.

      gptlab scale predict fit/fit.json --flops 1e21
      gptlab scale predict fit/fit.json --params 1.2e8 --tokens 2.4e9

    Args:
        fit: fit.json from `gptlab scale fit`
        flops: a compute budget C (FLOPs)
        params: parameters N (with --tokens)
        tokens: training tokens D (with --params)
    """
    from gptlab.scale.fit import PARAMS, predict

    d = read_json(Path(fit))
    missing = [k for k in PARAMS if not isinstance(d.get(k), (int, float))]
    if missing:
        raise GptlabError(f"{fit} is not a fit.json from `gptlab scale fit` (no {', '.join(missing)})")
    if flops is not None and (params is not None or tokens is not None):
        raise GptlabError("give either --flops, or --params and --tokens, not both")
    p = predict(d, flops=flops, params=params, tokens=tokens)
    print(json.dumps(p, indent=2))
    return 0


@command("scale sweep")
def scale_sweep(recipe: str | None = None, budgets: str = "3e11,1e12,3e12", sizes: str | None = None,
                seeds: str = "0", per_budget: int = 5, workers: int = 0, out: str = "scale-sweep") -> int:
    """Train a compute sweep: for each budget, `gptlab train` runs of the sizes that bracket its optimum,
    each stopped by the budget (--max-flops). Resumable: finished runs (OUT/runs.jsonl) are skipped.
    Without a recipe, each run's batch, learning rate and warm-up follow its budget and width
    (docs/scaling.md); a recipe's own values are used as they are.

      gptlab scale sweep --budgets 1e11,1e12,1e13 --out sweep
      gptlab scale sweep my-recipe.yaml --budgets 1e15,1e16 --sizes 4x256,6x384,8x512 --out sweep

    Args:
        recipe: a TrainConfig recipe (YAML) as the base of every run (default: python-docs, 512-token
            BPE, context 64, Qwen3's layout, AdamW)
        budgets: comma-separated compute budgets (FLOPs)
        sizes: LAYERSxWIDTH shapes to choose from (default: 4 layers, ~16K to 4.3M parameters)
        seeds: comma-separated seeds; every run once per seed
        per_budget: sizes per budget (those nearest 8 tokens per parameter)
        workers: runs side by side (0: one per CPU core on a CPU, 1 on a GPU)
        out: output dir (-o): runs.jsonl and runs/
    """
    from gptlab.limits import Limit, check
    from gptlab.recipe import load_recipe
    from gptlab.scale import sweep as sw
    from gptlab.train.pretrain import TrainConfig

    check("per_budget", per_budget, Limit(int, 1))
    check("workers", workers, Limit(int, 0))
    try:
        seed_list = tuple(int(s) for s in seeds.split(","))
    except ValueError:
        raise GptlabError(f"--seeds takes comma-separated integers, got {seeds!r}") from None
    base = load_recipe(TrainConfig, recipe) if recipe else sw.default_base()
    records = sw.sweep(base, sw.parse_budgets(budgets), sw.parse_sizes(sizes), Path(out), seed_list, per_budget,
                       scaling=None if recipe else sw.Scaling(), workers=workers or sw.auto_workers(base))
    print(f"{len(records)} runs in {Path(out) / 'runs.jsonl'}; fit them with `gptlab scale fit {Path(out) / 'runs.jsonl'}`")
    return 0


@command("scale run")
def scale_run(out: str = "scale-study", budgets: str | None = None, target: float | None = None,
              noise_seeds: int = 3, workers: int = 0) -> int:
    """The whole study: sweep tiny GPTs on python-docs, fit the law, write the prediction for a budget
    >= 10x the largest fitted one, then train that run and report predicted against observed loss.
    About 15 minutes on 2 CPU cores with the defaults; resumable. docs/scaling.md explains the output.

      gptlab scale run --out study
      gptlab scale run --budgets 1e15,3e15,1e16,3e16 --target 3e17 --out study   # on a GPU

    Args:
        out: output dir (-o): sweep/, fit/, prediction.json, target/, result.json, report.md
        budgets: the fit budgets (default 3e11,1e12,3e12)
        target: the predicted run's budget (default 3e13, 10x the largest)
        noise_seeds: seeds of one repeated run, to measure seed noise
        workers: sweep runs side by side (0: one per CPU core on a CPU, 1 on a GPU)
    """
    from gptlab.scale import sweep as sw
    from gptlab.scale.study import run_study

    from gptlab.limits import Limit, check

    check("workers", workers, Limit(int, 0))
    run_study(Path(out), sw.parse_budgets(budgets) if budgets else None, target, noise_seeds, workers=workers)
    print((Path(out) / "report.md").read_text())
    return 0
