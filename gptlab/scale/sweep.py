"""A compute sweep: ordinary `gptlab train` runs, each stopped by a FLOPs budget (TrainConfig.max_flops), over
model sizes that bracket each budget's optimum; and the study (`gptlab scale run`): sweep, fit, predict a
bigger run, then train it and compare.

Runs are named by budget, size and seed; DIR/runs.jsonl gets one record per finished run (params, tokens,
flops, loss and the run's settings), so a sweep that stops is resumed by running it again: finished runs are
skipped. N is the non-embedding parameters plus the head (the weights that cost 6 FLOPs per token to
train; see TrainConfig.max_flops), the loss the final validation loss in nats per token.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError
from gptlab.models import stats
from gptlab.scale.runs import append_run

# (layers, width, heads): tiny GPTs of one depth, from ~13K to ~3.3M parameters (N as counted here, vocabulary
# 512). One shape family on purpose: depth is not in L(N, D), and a first study that fitted 1- and 2-layer
# models and predicted a 4-layer one was 11% off (the deeper model did better than the law's N said).
DEPTH = 4
LADDER = [(DEPTH, w, max(1, w // 32)) for w in (12, 16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256)]
RATIO = (5.0, 2000.0)  # tokens per parameter a run may train on
CENTRE = 100.0  # sizes nearest this many tokens per parameter are chosen (tiny models' optimum is past Chinchilla's 20)


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


def model_params(base, size: tuple[int, int, int], vocab: int) -> int:
    """N of a size: non-embedding parameters + the head."""
    layers, width, heads = size
    config = base.model.replace(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, intermediate_size=None,
                                head_dim=None, n_kv_head=None)
    counts = stats.count_params(config)
    return counts["non_embedding"] + counts["head"]


def bracket(budget: float, sizes: list[tuple[int, int, int]], params: dict[tuple, int], per_budget: int = 5,
            ratio: tuple[float, float] = RATIO, centre: float = CENTRE) -> list[tuple[int, int, int]]:
    """The sizes for one budget: those training on `ratio` tokens per parameter (D = C / 6N), the
    `per_budget` nearest (in log) to `centre` tokens per parameter, so the optimum is bracketed."""
    ok = [s for s in sizes if ratio[0] <= budget / (6 * params[s] ** 2) <= ratio[1]]
    ok.sort(key=lambda s: abs(math.log(budget / (6 * params[s] ** 2) / centre)))
    return sorted(ok[:per_budget], key=lambda s: params[s])


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


def sweep(base, budgets: list[float], sizes: list[tuple[int, int, int]], out: Path, seeds: tuple[int, ...] = (0,),
          per_budget: int = 5, log=print) -> list[dict[str, Any]]:
    """Train every (budget, size, seed) not already in out/runs.jsonl; returns all the records."""
    from gptlab.formats.files import RunLock

    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out, option="--out")
    try:
        return _sweep(base, budgets, sizes, out, seeds, per_budget, log)
    finally:
        lock.release()


def _sweep(base, budgets, sizes, out, seeds, per_budget, log):
    from gptlab.data.shards import ensure_prepared, read_manifest
    from gptlab.train.pretrain import run_pretraining

    data_dir = ensure_prepared(base.data, tokenizer=base.tokenizer, vocab_size=base.vocab_size, cache=base.data_cache,
                               val_fraction=base.val_fraction, quiet=True)
    vocab = read_manifest(data_dir)["vocab_size"]
    params = {s: model_params(base, s, vocab) for s in sizes}
    plan = []
    for budget in budgets:
        chosen = bracket(budget, sizes, params, per_budget)
        if len(chosen) < min(3, per_budget, len(sizes)):
            log(f"budget {budget:.3g}: only {len(chosen)} size(s) train on {RATIO[0]:g} to {RATIO[1]:g} tokens per "
                "parameter; add --sizes that bracket it")
        plan += [(budget, s, seed) for s in chosen for seed in seeds]
    if not plan:
        raise GptlabError(f"no run to do: no size trains on {RATIO[0]:g} to {RATIO[1]:g} tokens per parameter at "
                          "these budgets")
    runs_file = out / "runs.jsonl"
    done = _done(runs_file)
    records = []
    for k, (budget, size, seed) in enumerate(plan, 1):
        name = f"C{budget:.3g}-{size_name(size)}-s{seed}"
        if name in done:
            records.append(done[name])
            continue
        cfg = dataclasses.replace(
            base, model=base.model.replace(n_layer=size[0], n_embd=size[1], n_head=size[2], intermediate_size=None,
                                           head_dim=None, n_kv_head=None),
            max_flops=budget, seed=seed, out_dir=str(out / "runs" / name), quiet=True, sample_tokens=0,
            eval_every=0, overwrite=True, resume=False, data=str(data_dir), tokenizer=None)
        t0 = time.perf_counter()
        result = run_pretraining(cfg)
        record = {"name": name, "params": result["params"], "tokens": result["tokens"], "flops": result["flops"],
                  "loss": result["val_loss"], "budget": budget, "layers": size[0], "width": size[1],
                  "heads": size[2], "seed": seed, "params_total": result["params_total"], "val_bpb": result.get("val_bpb"),
                  "wall_s": round(time.perf_counter() - t0, 2)}
        append_run(runs_file, record)
        records.append(record)
        log(f"[{k}/{len(plan)}] C={budget:.3g} {size_name(size)} (N={record['params'] / 1e6:.3f}M): "
            f"{record['tokens']:,} tokens, val loss {record['loss']:.4f} ({record['wall_s']:.0f} s)")
    return records


def default_base():
    """The sweep's default recipe: python-docs with a 512-token BPE, context 64, batch 16, AdamW 3e-3 with
    cosine decay over each run, a final evaluation on 40 validation batches (pinned here, so that changes to
    `gptlab train`'s own defaults leave the study as it was)."""
    from gptlab.train.pretrain import PretrainModel, TrainConfig

    model = PretrainModel(context_length=64)
    return TrainConfig(data="python-docs", vocab_size=512, model=model, batch_size=16, lr=3e-3, min_lr=3e-4,
                       warmup_steps=20, eval_batches=40, precision="fp32", optimizer="adamw")


def nearest_size(n_target: float, base, vocab: int) -> tuple[int, int, int]:
    """The ladder's shape (DEPTH layers; widths in steps of 8) whose N is nearest n_target."""
    best, gap = None, math.inf
    for width in range(16, 1025, 8):
        size = (DEPTH, width, max(1, width // 32))
        if width % size[2]:
            continue
        g = abs(math.log(model_params(base, size, vocab) / n_target))
        if g < gap:
            best, gap = size, g
    return best
