"""A compute sweep: ordinary `gptlab train` runs, each stopped by a FLOPs budget (TrainConfig.max_flops), over
model sizes that bracket each budget's optimum; the default recipe of `gptlab scale sweep` and `gptlab scale
run` (gptlab/scale/study.py), with its batch, learning rate and warm-up following each run's scale (Scaling).

Runs are named by budget, size and seed; DIR/runs.jsonl gets one record per finished run (params, tokens,
flops, loss and the run's settings), so a sweep that stops is resumed by running it again: finished runs are
skipped. On a CPU, runs train side by side, one process and one thread each (tiny models gain little from a
second thread). N is the non-embedding parameters plus the head (the weights that cost 6 FLOPs per token to
train; see TrainConfig.max_flops), the loss the mean over every window of the validation split.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError
from gptlab.models import stats
from gptlab.scale.runs import append_run

# (layers, width, heads): tiny models of one depth, from ~16K to ~4.3M parameters (N as counted here,
# vocabulary 512). One shape family on purpose: depth is not in L(N, D), and a first study that fitted 1- and
# 2-layer models and predicted a 4-layer one was 11% off (the deeper model did better than the law's N said).
DEPTH = 4
LADDER = [(DEPTH, w, max(1, w // 32)) for w in (12, 16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256)]
RATIO = (1.0, 1000.0)  # tokens per parameter (C / 6N^2) a run may train on
# sizes nearest this many tokens per parameter are chosen: the default study's IsoFLOP minima lie at 5 to 20
CENTRE = 8.0


def size_name(size: tuple[int, int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def parse_sizes(text: str | None) -> list[tuple[int, int, int]]:
    """--sizes 2x64,4x128 (layers x width; heads: width / 32, at least 1), or None for the ladder."""
    if not text:
        return list(LADDER)
    out = []
    for part in str(text).split(","):
        try:
            layers, width = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise GptlabError(f"--sizes takes LAYERSxWIDTH entries such as 2x64,4x128; got {part!r}") from None
        if layers < 1 or width < 8:
            raise GptlabError(f"--sizes entry {part!r}: at least 1 layer and width 8")
        out.append((layers, width, max(1, width // 32)))
    return out


def parse_budgets(text: str) -> list[float]:
    try:
        budgets = sorted(float(x) for x in str(text).split(","))
    except ValueError:
        raise GptlabError(f"--budgets takes comma-separated FLOP counts such as 4e10,1.2e11; got {text!r}") from None
    if not budgets or any(not math.isfinite(b) or b <= 0 for b in budgets):
        raise GptlabError(f"--budgets must be positive numbers, got {text!r}")
    return budgets


def shaped(model, size: tuple[int, int, int]):
    """The model settings with this (layers, width, heads); MLP width, head size and kv heads follow from them."""
    return model.replace(n_layer=size[0], n_embd=size[1], n_head=size[2], intermediate_size=None, head_dim=None,
                         n_kv_head=None)


def model_params(base, size: tuple[int, int, int], vocab: int) -> int:
    """N of a size: non-embedding parameters + the head."""
    counts = stats.count_params(shaped(base.model, size).replace(vocab_size=vocab))
    return counts["non_embedding"] + counts["head"]


def bracket(budget: float, sizes: list[tuple[int, int, int]], params: dict[tuple, int], per_budget: int = 5,
            ratio: tuple[float, float] = RATIO, centre: float = CENTRE) -> list[tuple[int, int, int]]:
    """The sizes for one budget: those training on `ratio` tokens per parameter (D = C / 6N), the
    `per_budget` nearest (in log) to `centre` tokens per parameter, so the optimum is bracketed."""
    ok = [s for s in sizes if ratio[0] <= budget / (6 * params[s] ** 2) <= ratio[1]]
    ok.sort(key=lambda s: abs(math.log(budget / (6 * params[s] ** 2) / centre)))
    return sorted(ok[:per_budget], key=lambda s: params[s])


@dataclass(frozen=True)
class Scaling:
    """The default recipe's batch, learning rate and warm-up as functions of a run's scale, so that each run of
    a study, the target included, is trained about as well as its budget allows. One fixed recipe is tuned for
    one scale: 16 rows of 64 tokens, 20 warm-up steps and AdamW at 3e-3 left the runs at 1e11 to 1e12 FLOPs
    0.2 to 0.3 nats short of what the same models reached with settings tuned at those budgets
    (docs/scaling.md, "Why the first study missed").

        rows per step = rows_at_1e12 x (C / 1e12)^batch_exponent  (DeepSeek LLM 2024, sec. 3.1: B_opt ~ C^0.33)
        peak lr       = min(lr_max, lr_width / width), decayed to a tenth   (muP's 1 / width for Adam)
        warm-up       = warmup_tokens x N tokens, at most a fifth of the run  (Porian et al. 2024)

    The constants were measured at 1e11 to 3e12 FLOPs (widths 16 to 64), never at a target budget.
    """

    rows_at_1e12: float = 8.0
    batch_exponent: float = 1 / 3
    lr_width: float = 0.2
    lr_max: float = 6e-3
    warmup_tokens: float = 1.0

    def rows(self, budget: float) -> int:
        return max(2, round(self.rows_at_1e12 * (budget / 1e12) ** self.batch_exponent))

    def lr(self, width: int) -> float:
        return min(self.lr_max, self.lr_width / width)


def run_config(base, size: tuple[int, int, int], budget: float, seed: int, out_dir: Path, vocab: int,
               scaling: Scaling | None = None):
    """The TrainConfig of one budgeted run: `base` with this size, budget and seed, and with `scaling` the
    batch, learning rate and warm-up of this scale (None: the base's own, as a user's recipe gives them)."""
    cfg = dataclasses.replace(
        base, model=shaped(base.model, size), max_flops=budget, seed=seed, out_dir=str(out_dir), quiet=True,
        sample_tokens=0, eval_every=0, overwrite=True, resume=False)
    if scaling is None:
        return cfg
    lr = scaling.lr(size[1])
    cfg = dataclasses.replace(cfg, batch_size=scaling.rows(budget), lr=lr, min_lr=lr / 10)
    per_step = (cfg.seq_len or cfg.model.context_length) * cfg.batch_size * cfg.grad_accum
    steps = tokens_bought(cfg, vocab) // per_step
    warmup = round(scaling.warmup_tokens * model_params(base, size, vocab) / per_step)
    return dataclasses.replace(cfg, warmup_steps=max(1, min(warmup, steps // 5)))


def tokens_bought(cfg, vocab: int) -> int:
    """The tokens a budgeted run trains on: the whole steps cfg.max_flops buys at the FLOPs per token the run
    counts (attention included), as run_pretraining counts them."""
    seq = cfg.seq_len or cfg.model.context_length
    per_step = seq * cfg.batch_size * cfg.grad_accum
    fpt = stats.flops_per_token(cfg.model.replace(vocab_size=vocab), seq, training=True)
    return int(cfg.max_flops // (fpt * per_step)) * per_step


def heldout_loss(model_dir: Path, data_dir: Path, seq_len: int, rows: int = 64) -> float:
    """Mean next-token loss over every window of the validation split: the same windows for every run,
    whatever its batch size (the trainer's evaluation takes whole batches of the run's own size, which leave
    out a different tail of the split for each size)."""
    import torch

    from gptlab.data.shards import TokenWindows
    from gptlab.formats.hf import load
    from gptlab.train.losses import next_token_loss

    model = load(model_dir, dtype=torch.float32).eval()
    val = TokenWindows(data_dir, "val", seq_len, 1, shuffle=False)  # len(val): every window, one per batch
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(val), rows):
            parts = [val.batch(i) for i in range(start, min(start + rows, len(val)))]
            loss, n = next_token_loss(model, {k: torch.cat([p[k] for p in parts]) for k in parts[0]})
            total, count = total + float(loss), count + int(n)
    return total / count


def run_name(budget: float, size: tuple[int, int, int], seed: int) -> str:
    return f"C{budget:.3g}-{size_name(size)}-s{seed}"


def finished_runs(out: Path) -> dict[str, dict]:
    """The records in out/runs.jsonl by run name: the runs a sweep into `out` will skip."""
    return _done(out / "runs.jsonl")


def _done(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash: that run is redone
            out[row.get("name")] = row
    return out


def auto_workers(base) -> int:
    """Runs side by side: one per CPU core the process may use (at most 8) when training on the CPU, else 1."""
    import torch

    if base.device not in ("auto", "cpu") or (base.device == "auto" and torch.cuda.is_available()):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores))


def sweep(base, budgets: list[float], sizes: list[tuple[int, int, int]], out: Path, seeds: tuple[int, ...] = (0,),
          per_budget: int | None = 5, scaling: Scaling | None = None, workers: int = 1,
          log=print) -> list[dict[str, Any]]:
    """Train every (budget, size, seed) not already in out/runs.jsonl, `workers` runs at a time; returns all
    the records in plan order. Each budget trains the `per_budget` sizes that bracket its optimum (None: every
    size given). `scaling`: each run's batch, learning rate and warm-up follow its scale (the default recipe);
    None keeps the base's."""
    from gptlab.formats.files import RunLock

    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out, option="--out")
    try:
        return _sweep(base, budgets, sizes, out, seeds, per_budget, scaling, workers, log)
    finally:
        lock.release()


def _sweep(base, budgets, sizes, out, seeds, per_budget, scaling, workers, log):
    from gptlab.data.shards import ensure_prepared, read_manifest

    data_dir = ensure_prepared(base.data, tokenizer=base.tokenizer, vocab_size=base.vocab_size, cache=base.data_cache,
                               val_fraction=base.val_fraction, quiet=True)
    vocab = read_manifest(data_dir)["vocab_size"]
    base = dataclasses.replace(base, data=str(data_dir), tokenizer=None)
    params = {s: model_params(base, s, vocab) for s in sizes}
    plan = []
    for budget in budgets:
        chosen = list(sizes) if per_budget is None else bracket(budget, sizes, params, per_budget)
        if per_budget is not None and len(chosen) < min(3, per_budget, len(sizes)):
            log(f"budget {budget:.3g}: only {len(chosen)} size(s) train on {RATIO[0]:g} to {RATIO[1]:g} tokens per "
                "parameter; add --sizes that bracket it")
        plan += [(budget, s, seed) for s in chosen for seed in seeds]
    if not plan:
        raise GptlabError(f"no run to do: no size trains on {RATIO[0]:g} to {RATIO[1]:g} tokens per parameter at "
                          "these budgets")
    runs_file = out / "runs.jsonl"
    done = _done(runs_file)
    names = [run_name(budget, size, seed) for budget, size, seed in plan]
    todo = [(name, run_config(base, size, budget, seed, out / "runs" / name, vocab, scaling), budget, size)
            for name, (budget, size, seed) in zip(names, plan) if name not in done]
    finished = len(plan) - len(todo)

    def record(job, result) -> None:
        nonlocal finished
        name, cfg, budget, size = job
        row = {"name": name, "params": result["params"], "tokens": result["tokens"], "flops": result["flops"],
               "loss": result["loss"], "budget": budget, "layers": size[0], "width": size[1], "heads": size[2],
               "seed": cfg.seed, "params_total": result["params_total"], "batch_size": cfg.batch_size, "lr": cfg.lr,
               "warmup_steps": cfg.warmup_steps, "wall_s": result["wall_s"]}
        append_run(runs_file, row)
        done[name] = row
        finished += 1
        log(f"[{finished}/{len(plan)}] C={budget:.3g} {size_name(size)} (N={row['params'] / 1e6:.3f}M): "
            f"{row['tokens']:,} tokens, val loss {row['loss']:.4f} ({row['wall_s']:.0f} s)")

    workers = min(workers, len(todo))
    if workers <= 1:
        for job in todo:
            record(job, train_run(job[1]))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = max(1, auto_workers(base) // workers)
        todo.sort(key=lambda job: -job[2])  # the longest runs first: the last to finish is a short one
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(train_run, job[1], threads): job for job in todo}
            for future in as_completed(futures):
                record(futures[future], future.result())
    return [done[name] for name in names]


def train_run(cfg, threads: int = 0) -> dict[str, Any]:
    """One budgeted run (`threads`: torch's threads in a worker process; 0 leaves them as they are) and its
    held-out loss."""
    from gptlab.train.pretrain import run_pretraining

    if threads:
        import torch

        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    result = run_pretraining(cfg)
    loss = heldout_loss(Path(cfg.out_dir) / "final", Path(cfg.data), cfg.seq_len or cfg.model.context_length)
    return {**{k: result[k] for k in ("params", "params_total", "tokens", "flops")}, "loss": loss,
            "wall_s": round(time.perf_counter() - t0, 2)}


def default_base():
    """The sweep's default recipe: python-docs with a 512-token BPE, context 64, Qwen3's layout (rotary
    positions, RMSNorm, QK-norm, SwiGLU, no biases, tied embeddings, residual projections starting at zero:
    at 1e12 FLOPs it reached 2.9 nats where GPT-2's layout reached 3.4), AdamW with cosine decay over each run
    (its batch, peak learning rate and warm-up set per run by Scaling). Pinned here, so that changes to `gptlab
    train`'s own defaults leave the study as it was."""
    from gptlab.train.pretrain import PretrainModel, TrainConfig

    model = PretrainModel(model_type="qwen3", context_length=64, positions="rotary", norm="rmsnorm", qk_norm=True,
                          mlp="glu", mlp_bias=False, activation="silu", qkv_bias=False, attn_out_bias=False,
                          tie_embeddings=True, zero_init_proj=True)
    return TrainConfig(data="python-docs", vocab_size=512, model=model, batch_size=8, lr=5e-3, min_lr=5e-4,
                       warmup_steps=20, eval_batches=1, precision="fp32", optimizer="adamw")


def nearest_size(n_target: float, base, vocab: int) -> tuple[int, int, int]:
    """The ladder's shape (DEPTH layers; widths in steps of 8, heads of an even size, as rotary positions need)
    whose N is nearest n_target."""
    best, gap = None, math.inf
    for width in range(16, 1025, 8):
        size = (DEPTH, width, max(1, width // 32))
        if width % size[2] or width // size[2] % 2:
            continue
        g = abs(math.log(model_params(base, size, vocab) / n_target))
        if g < gap:
            best, gap = size, g
    return best
