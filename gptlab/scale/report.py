"""A fit written out: DIR/fit.json, DIR/fit.md and the plots (loss against compute with the fitted frontier
and its 95% band, the IsoFLOP curves, the residuals)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from gptlab.scale.fit import Fit, frontier_loss, law_loss, optimal
from gptlab.scale.runs import Runs, isoflop_groups


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_compute(fit: Fit, runs: Runs, path: Path, target: dict[str, Any] | None = None) -> None:
    """Runs as loss against compute (colour: parameters), the law's compute-optimal loss with its band, the
    frontier fit; `target`: a predicted point with its interval (and the observed loss, when known)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8), constrained_layout=True)
    sc = ax.scatter(runs.flops, runs.loss, c=np.log10(runs.params), cmap="viridis", s=18, edgecolors="k",
                    linewidths=0.3, label="runs")
    fig.colorbar(sc, ax=ax, label="log10 parameters")
    hi = max(runs.flops.max(), target["flops"] if target else 0) * 3
    C = np.logspace(np.log10(runs.flops.min() / 3), np.log10(hi), 120)
    ax.plot(C, optimal(fit.law, C)[2], color="C3", label="L(N_opt, D_opt): compute-optimal law")
    if fit.samples:
        band = np.array([optimal(s, C)[2] for s in fit.samples])
        ax.fill_between(C, np.percentile(band, 2.5, 0), np.percentile(band, 97.5, 0), color="C3", alpha=0.2,
                        label="95% bootstrap band")
    if fit.frontier:
        ax.plot(C, frontier_loss(fit.frontier, C), "--", color="C1", label="frontier E + K C^-gamma")
    if target:
        lo, hi_ = target.get("prediction_interval") or target.get("interval") or (target["loss"],) * 2
        ax.errorbar([target["flops"]], [target["loss"]], yerr=[[target["loss"] - lo], [hi_ - target["loss"]]],
                    fmt="D", color="C3", capsize=4, label="prediction (95%)")
        if target.get("observed") is not None:
            ax.plot([target["flops"]], [target["observed"]], "*", color="k", markersize=12, label="observed")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plain_log_ticks(ax) -> None:
    """A log loss axis spans less than a decade: label it at round values (2.2, 2.4, ...), not 3 x 10^0."""
    from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator, ScalarFormatter

    lo, hi = ax.get_ylim()
    ticks = [t for t in MaxNLocator(8).tick_values(lo, hi) if lo <= t <= hi]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(ScalarFormatter())


def plot_isoflops(fit: Fit, runs: Runs, path: Path) -> None:
    """Loss against parameters per compute budget: the runs, the law at that budget, the parabola's minimum."""
    plt = _plt()
    groups = isoflop_groups(runs)
    fig, ax = plt.subplots(figsize=(8.5, 4.8), constrained_layout=True)
    cmap = plt.get_cmap("plasma")
    for k, g in enumerate(groups):
        colour = cmap(k / max(1, len(groups) - 1) * 0.85)
        C = float(np.exp(np.mean(np.log(runs.flops[g]))))
        order = np.argsort(runs.params[g])
        ax.plot(runs.params[g][order], runs.loss[g][order], "o", color=colour, label=f"C = {C:.2g}")
        N = np.logspace(np.log10(runs.params[g].min() / 1.5), np.log10(runs.params[g].max() * 1.5), 80)
        # the tokens a run of N gets at this budget: C / 6N shrunk by the runs' own FLOPs per token over 6N
        # (attention counts too), so the line passes where the law puts the runs
        over = np.interp(np.log(N), np.log(runs.params[g][order]), (runs.flops / (6 * runs.params * runs.tokens))[g][order])
        ax.plot(N, law_loss(fit.law, N, C / (6 * N * over)), "-", color=colour, alpha=0.7)
    if fit.approach2:
        for row in fit.approach2["budgets"]:
            ax.plot([row["N_opt"]], [row["loss_opt"]], "x", color="k", markersize=8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("IsoFLOP curves: runs, the fitted law (lines), parabola minima (x)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if groups:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="budget", title_fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_residuals(fit: Fit, runs: Runs, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.6), constrained_layout=True)
    sc = ax.scatter(runs.flops, 100 * (np.exp(fit.residuals) - 1), c=np.log10(runs.params), cmap="viridis", s=16)
    fig.colorbar(sc, ax=ax, label="log10 parameters")
    ax.axhline(0, color="k", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("law / observed - 1 (%)")
    ax.set_title(f"residuals: std of log residual {np.std(fit.residuals):.4f}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def markdown(fit: Fit, runs: Runs) -> str:
    d = fit.to_dict()
    iv = d["intervals"]
    lines = ["# Scaling-law fit", "", f"{len(runs)} runs from `{runs.source}`; N from {_fmt(runs.params.min())} to "
             f"{_fmt(runs.params.max())} parameters, C from {_fmt(runs.flops.min())} to {_fmt(runs.flops.max())} FLOPs.",
             "", "## L(N, D) = E + A / N^alpha + B / D^beta (Chinchilla approach 3)", "",
             "| constant | fit | 95% interval |", "|---|---|---|"]
    for k in ("E", "A", "B", "alpha", "beta", "a", "b"):
        span = f"{_fmt(iv[k][0])} .. {_fmt(iv[k][1])}" if iv.get(k) else "-"
        lines.append(f"| {k} | {_fmt(d[k])} | {span} |")
    co = d["compute_optimal"]
    lines += ["", f"Compute-optimal: N_opt = {co['N_opt']}, D_opt = {co['D_opt']} (a = beta / (alpha + beta), "
              "b = alpha / (alpha + beta)).",
              f"Residual std (log loss): {d['residual_std']:.4f}; {d['method']['bootstrap']} bootstrap refits; "
              f"L-BFGS from the {d['method']['starts']} best of {np.prod([len(v) for v in d['method']['grid'].values()])} "
              "grid points, Huber delta 1e-3 on log loss."]
    if fit.edge:
        lines += ["", f"**Warning**: {', '.join(fit.edge)} lie outside the starting grid's span; the fit may be a "
                  "poor local optimum or the data may not constrain it."]
    if fit.approach2:
        a2 = fit.approach2
        lines += ["", "## IsoFLOP profiles (approach 2)", "", f"N_opt ~ C^{a2['a']:.3f}, D_opt ~ C^{a2['b']:.3f}", "",
                  "| budget C | N_opt | D_opt | loss at N_opt | runs | bracketed |", "|---|---|---|---|---|---|"]
        lines += [f"| {_fmt(r['flops'])} | {_fmt(r['N_opt'])} | {_fmt(r['D_opt'])} | {r['loss_opt']:.4f} | {r['runs']} | "
                  f"{'yes' if r['bracketed'] else 'no'} |" for r in a2["budgets"]]
    if fit.frontier:
        f = fit.frontier
        lines += ["", "## Compute frontier", "", f"L(C) = {f['E']:.4f} + {f['K']:.4g} C^-{f['gamma']:.4f} through "
                  f"{len(f['points'])} frontier points (GPT-4 technical report's form)."]
    lines += ["", "Plots: `compute.png` (loss against compute, the law's compute-optimal curve and its band), "
              "`isoflops.png` (loss against N per budget), `residuals.png`.", ""]
    return "\n".join(lines)


def write_fit(fit: Fit, runs: Runs, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "fit.json", "md": out / "fit.md", "compute": out / "compute.png",
             "isoflops": out / "isoflops.png", "residuals": out / "residuals.png"}
    paths["json"].write_text(json.dumps(fit.to_dict(), indent=2) + "\n")
    paths["md"].write_text(markdown(fit, runs), encoding="utf-8")
    plot_compute(fit, runs, paths["compute"])
    plot_isoflops(fit, runs, paths["isoflops"])
    plot_residuals(fit, runs, paths["residuals"])
    return paths
