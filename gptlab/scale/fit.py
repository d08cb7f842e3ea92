"""Scaling-law fits of training runs: Chinchilla's approaches 3 and 2, and the compute frontier.

Approach 3 (Hoffmann et al. 2022, sec. 3.3 and appendix D.2): the parametric loss

    L(N, D) = E + A / N^alpha + B / D^beta

fitted as log L = LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e, minimising the
summed Huber loss (delta = 1e-3) of the log-loss residuals with L-BFGS from a grid of starting points
(alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25}), keeping the best. To
keep it fast the whole grid's objective is evaluated first and L-BFGS runs from its `starts` best points
(64: on the Chinchilla data the same optimum as from all 4,500). A fit whose parameters lie outside the
grid's span is flagged: the grid may not have covered it. Intervals: the same fit on `bootstrap`
resamplings of the runs (percentiles). With C = 6 N D, the compute-optimal allocation (their eq. 4) is

    N_opt(C) = G (C / 6)^a,  D_opt(C) = G^-1 (C / 6)^b,  G = (alpha A / (beta B))^(1 / (alpha + beta)),
    a = beta / (alpha + beta),  b = alpha / (alpha + beta).

Approach 2, where runs form IsoFLOP groups (one budget, >= 3 sizes): a parabola of loss in log N per
budget, its vertex N_opt, and N_opt = k C^a by least squares in log-log (D_opt = C / 6 N_opt likewise).
The compute frontier (GPT-4 technical report, sec. 3.1): L(C) = E_c + K C^-gamma through the lowest loss
at each budget.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gptlab.errors import GptlabError
from gptlab.scale.runs import Runs, isoflop_groups

PARAMS = ("E", "A", "B", "alpha", "beta")
BOOTSTRAP_STARTS = 8  # grid starting points of each bootstrap refit (besides the full fit)
GRID = {"a": np.arange(0, 30, 5.0), "b": np.arange(0, 30, 5.0), "e": np.arange(-1, 1.5, 0.5),
        "alpha": np.arange(0, 2.5, 0.5), "beta": np.arange(0, 2.5, 0.5)}


# ---------------------------------------------------------------------------------------------------------
# approach 3


def _objective(p: np.ndarray, lN: np.ndarray, lD: np.ndarray, lL: np.ndarray, delta: float):
    """Summed Huber loss of log L_hat - log L, and its gradient in (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = p
    t1, t2 = a - alpha * lN, b - beta * lD
    t3 = np.full_like(lN, e)
    m = np.maximum(np.maximum(t1, t2), t3)
    w1, w2, w3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(t3 - m)
    s = w1 + w2 + w3
    r = m + np.log(s) - lL
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum()
    g = np.where(small, r, delta * np.sign(r))
    p1, p2, p3 = w1 / s, w2 / s, w3 / s
    grad = np.array([(g * p1).sum(), (g * p2).sum(), (g * p3).sum(), -(g * p1 * lN).sum(), -(g * p2 * lD).sum()])
    return value, grad


def _grid_values(lN, lD, lL, delta) -> tuple[np.ndarray, np.ndarray]:
    grid = np.array(list(itertools.product(*GRID.values())))  # (4500, 5): a, b, e, alpha, beta
    t1 = grid[:, 0:1] - grid[:, 3:4] * lN  # (G, R)
    t2 = grid[:, 1:2] - grid[:, 4:5] * lD
    pred = np.logaddexp(np.logaddexp(t1, t2), grid[:, 2:3])
    r = np.abs(pred - lL)
    return grid, np.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta)).sum(1)


def _lbfgs(starts: np.ndarray, lN, lD, lL, delta) -> np.ndarray | None:
    from scipy.optimize import minimize

    best, best_value = None, math.inf
    for s in starts:
        res = minimize(_objective, s, args=(lN, lD, lL, delta), jac=True, method="L-BFGS-B")
        if np.all(np.isfinite(res.x)) and res.fun < best_value:
            best, best_value = res.x, res.fun
    return best


def _to_law(p: np.ndarray) -> dict[str, float]:
    a, b, e, alpha, beta = (float(x) for x in p)
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta}


def law_loss(law: dict[str, float], N, D):
    return law["E"] + law["A"] / np.power(N, law["alpha"]) + law["B"] / np.power(D, law["beta"])


def allocation(law: dict[str, float]) -> dict[str, float]:
    """a, b and G of N_opt = G (C/6)^a, D_opt = (C/6)^b / G (Hoffmann et al., eq. 4)."""
    al, be = law["alpha"], law["beta"]
    if al <= 0 or be <= 0:
        return {"a": math.nan, "b": math.nan, "G": math.nan}
    return {"a": be / (al + be), "b": al / (al + be), "G": (al * law["A"] / (be * law["B"])) ** (1 / (al + be))}


def optimal(law: dict[str, float], C) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compute-optimal N, D and the loss there, for budgets C."""
    al = allocation(law)
    C = np.asarray(C, dtype=float)
    N = al["G"] * (C / 6) ** al["a"]
    D = (C / 6) ** al["b"] / al["G"]
    return N, D, law_loss(law, N, D)


@dataclass
class Fit:
    law: dict[str, float]  # E, A, B, alpha, beta
    intervals: dict[str, list[float]]  # 95% bootstrap intervals of the law's constants and a, b
    samples: list[dict[str, float]]  # the bootstrap fits
    residuals: np.ndarray  # log L_hat - log L of each run
    edge: list[str] = field(default_factory=list)  # parameters outside the starting grid's span
    approach2: dict[str, Any] | None = None
    frontier: dict[str, Any] | None = None
    n_runs: int = 0
    delta: float = 1e-3
    starts: int = 64

    def to_dict(self) -> dict[str, Any]:
        al = allocation(self.law)
        return {
            **self.law, "a": al["a"], "b": al["b"], "G": al["G"], "intervals": self.intervals,
            "compute_optimal": {
                "N_opt": f"{al['G']:.6g} * (C / 6) ** {al['a']:.6g}",
                "D_opt": f"(C / 6) ** {al['b']:.6g} / {al['G']:.6g}",
                "N_opt_coef": al["G"] * 6 ** -al["a"], "N_opt_exp": al["a"],
                "D_opt_coef": 6 ** -al["b"] / al["G"], "D_opt_exp": al["b"],
            },
            "residual_std": float(np.std(self.residuals)), "grid_edge": self.edge,
            "approach2": self.approach2, "frontier": self.frontier,
            "method": {"form": "L = E + A/N^alpha + B/D^beta", "loss": f"Huber(delta={self.delta}) on log L",
                       "optimizer": "L-BFGS-B", "grid": {k: v.tolist() for k, v in GRID.items()},
                       "starts": self.starts, "bootstrap": len(self.samples)},
            "runs": self.n_runs, "bootstrap_samples": self.samples,
            "residuals": [float(r) for r in self.residuals],
        }


def fit_law(runs: Runs, bootstrap: int = 200, delta: float = 1e-3, starts: int = 64, seed: int = 0,
            progress: bool = False) -> Fit:
    """Approach 3 on `runs`, with `bootstrap` resampled refits for the intervals; plus approach 2 and the
    frontier where the runs allow them."""
    if len(runs) < 6:
        raise GptlabError(f"{runs.source or 'the runs'}: {len(runs)} run(s) for a 5-parameter law; give at least 6")
    # one canonical order, so that the same runs give the same fit whatever order they were written in (the
    # runs of a parallel sweep land in finishing order): the objective is nearly L1 and flat near its
    # minimum, where summation order and the bootstrap's draws would otherwise move the result
    order = np.lexsort((runs.loss, runs.tokens, runs.params, runs.flops))
    lN, lD, lL = np.log(runs.params[order]), np.log(runs.tokens[order]), np.log(runs.loss[order])
    grid, values = _grid_values(lN, lD, lL, delta)
    best = _lbfgs(grid[np.argsort(values, kind="stable")[:starts]], lN, lD, lL, delta)
    if best is None:
        raise GptlabError("the fit did not converge from any starting point")
    law = _to_law(best)
    lo, hi = grid.min(0), grid.max(0)
    edge = [name for name, x, l, h in zip(("a", "b", "e", "alpha", "beta"), best, lo, hi) if not l <= x <= h]
    residuals = np.log(law_loss(law, runs.params, runs.tokens)) - np.log(runs.loss)  # in the runs' own order

    rng = np.random.default_rng(seed)
    samples = []
    from tqdm.auto import tqdm

    for _ in tqdm(range(bootstrap), desc="bootstrap", disable=not progress):
        idx = rng.integers(0, len(runs), len(runs))
        # each resample's own best fit: from the full fit and from the resample's best grid points (the
        # objective is nearly L1, with many local minima; refits from the full fit alone stay near it and
        # give intervals too narrow)
        g, v = _grid_values(lN[idx], lD[idx], lL[idx], delta)
        p = _lbfgs(np.vstack([best, g[np.argsort(v, kind="stable")[:BOOTSTRAP_STARTS]]]), lN[idx], lD[idx], lL[idx],
                   delta)
        if p is not None:
            s = _to_law(p)
            s.update({k: v for k, v in allocation(s).items() if k in ("a", "b")})
            samples.append(s)
    intervals = {}
    for k in (*PARAMS, "a", "b"):
        vals = np.array([s[k] for s in samples if math.isfinite(s[k])])
        intervals[k] = [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))] if len(vals) else []
    return Fit(law, intervals, samples, residuals, edge, approach2(runs), frontier(runs), len(runs), delta, starts)


# ---------------------------------------------------------------------------------------------------------
# approach 2 and the compute frontier


def approach2(runs: Runs) -> dict[str, Any] | None:
    """IsoFLOP parabolas: per budget, loss ~ quadratic in log N; N_opt = k C^a over budgets (>= 2 of them)."""
    groups = isoflop_groups(runs)
    rows = []
    for g in groups:
        x, y = np.log(runs.params[g]), runs.loss[g]
        c2, c1, c0 = np.polyfit(x, y, 2)
        if c2 <= 0:
            continue  # no minimum: the sizes do not bracket this budget's optimum
        x_opt = -c1 / (2 * c2)
        C = float(np.exp(np.mean(np.log(runs.flops[g]))))
        n_opt = float(np.exp(x_opt))
        rows.append({"flops": C, "N_opt": n_opt, "D_opt": C / (6 * n_opt), "loss_opt": float(np.polyval([c2, c1, c0], x_opt)),
                     "parabola": [float(c2), float(c1), float(c0)], "runs": len(g),
                     "bracketed": bool(x.min() <= x_opt <= x.max())})
    if len(rows) < 2:
        return None
    lC = np.log([r["flops"] for r in rows])
    a, log_k = np.polyfit(lC, np.log([r["N_opt"] for r in rows]), 1)
    b, log_kd = np.polyfit(lC, np.log([r["D_opt"] for r in rows]), 1)
    return {"a": float(a), "b": float(b), "N_opt_coef": float(np.exp(log_k)), "D_opt_coef": float(np.exp(log_kd)),
            "budgets": rows}


def frontier(runs: Runs) -> dict[str, Any] | None:
    """L(C) = E + K C^-gamma through the lowest loss of each budget (IsoFLOP groups), or else the runs that
    set a new lowest loss as compute grows."""
    groups = isoflop_groups(runs)
    if len(groups) >= 3:
        pts = [(float(np.exp(np.mean(np.log(runs.flops[g])))), float(runs.loss[g].min())) for g in groups]
    else:
        pts, low = [], math.inf
        for i in np.argsort(runs.flops):
            if runs.loss[i] < low:
                low = runs.loss[i]
                pts.append((float(runs.flops[i]), float(low)))
    if len(pts) < 3:
        return None
    from scipy.optimize import curve_fit

    C = np.array([p[0] for p in pts])
    L = np.array([p[1] for p in pts])
    scale = C.min()

    def form(c, E, logK, gamma):
        return E + np.exp(logK) * (c / scale) ** -gamma

    import warnings

    try:
        with warnings.catch_warnings():  # with 3 points the covariance is undefined; only the fit is used
            warnings.simplefilter("ignore")
            (E, logK, gamma), _ = curve_fit(form, C, L, p0=(0.5 * L.min(), math.log(max(L.max() - 0.5 * L.min(), 1e-3)), 0.1),
                                            bounds=([0, -50, 0], [L.min(), 50, 5]), maxfev=20000)
    except (RuntimeError, ValueError):
        return None
    return {"E": float(E), "K": float(math.exp(logK) * scale ** gamma), "gamma": float(gamma),
            "points": [{"flops": c, "loss": l} for c, l in pts]}


def frontier_loss(front: dict[str, Any], C):
    return front["E"] + front["K"] * np.power(np.asarray(C, dtype=float), -front["gamma"])


# ---------------------------------------------------------------------------------------------------------
# prediction


def predict(fit: dict[str, Any], flops: float | None = None, params: float | None = None,
            tokens: float | None = None) -> dict[str, Any]:
    """From a fit.json dict: at a budget, the compute-optimal N, D and loss; or the loss of N params on D
    tokens. `interval`: 95% of the bootstrap laws' values there; `prediction_interval` adds the runs'
    scatter around the law (their log residuals), for where one new run's loss should fall."""
    law = {k: fit[k] for k in PARAMS}
    samples = fit.get("bootstrap_samples") or []
    resid = np.array(fit.get("residuals") or [0.0])
    if flops is not None:
        if not flops > 0:
            raise GptlabError(f"--flops must be a positive number, got {flops}")
        N, D, L = (float(x) for x in optimal(law, flops))
        per = [optimal(s, flops)[2] for s in samples]
        out = {"flops": flops, "params": N, "tokens": D, "loss": L}
    else:
        if params is None or tokens is None or not params > 0 or not tokens > 0:
            raise GptlabError("give --flops C, or both --params N and --tokens D (positive numbers)")
        L = float(law_loss(law, params, tokens))
        per = [law_loss(s, params, tokens) for s in samples]
        out = {"params": params, "tokens": tokens, "flops": 6 * params * tokens, "loss": L}
    per = np.array([float(p) for p in per if np.isfinite(p)])
    if len(per):
        out["interval"] = [float(np.percentile(per, 2.5)), float(np.percentile(per, 97.5))]
        rng = np.random.default_rng(0)
        noisy = rng.choice(per, 4000) * np.exp(rng.choice(-resid, 4000))  # observed = law x e^(-residual)
        out["prediction_interval"] = [float(np.percentile(noisy, 2.5)), float(np.percentile(noisy, 97.5))]
    return out
