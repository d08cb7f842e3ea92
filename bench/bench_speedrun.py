"""Time to validation bits per byte on python-docs: gptlab's speedrun recipe against nanoGPT's recipe, in one run.

    .venv/bin/python bench/bench_speedrun.py                      # nanoGPT 10 min, then the recipe's 4 min budget
    .venv/bin/python bench/bench_speedrun.py --ref-minutes 3 --budget 90s     # a shorter look

1. nanoGPT: a clean re-implementation of nanoGPT's train.py and model.py (learned positions, LayerNorm, GELU MLP,
   tied head, init N(0, 0.02) with the residual projections scaled by 1/sqrt(2 * layers), fused AdamW
   (0.9, 0.95), weight decay 0.1 on 2-D weights, gradient clipping 1.0, random windows drawn with torch.randint)
   with the recipe it is measured with: 6 layers x 384, context 256, batch 8, AdamW 1e-3 -> 1e-4 cosine over
   1600 steps after 100 warm-up steps. It runs for --ref-minutes of training time.
2. gptlab: `gptlab train recipes/speedrun-python-docs.yaml --time-budget BUDGET`, the whole command, in a fresh
   process, as a user runs it.

Both read the same prepared data (python-docs, a 4,096-token byte-level BPE, 2% validation), use bf16 autocast
only where the CPU has native bf16 (else fp32, as gptlab's precision "auto"), and report bits per byte over the
whole validation split at their own context length. The clock is training time: evaluations are left out on
both sides (gptlab's eval records carry train_s). Printed: each side's curve, then for every threshold the
first time each side's evaluated bpb reached it, and the ratio nanoGPT time / gptlab time.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "speedrun-python-docs.yaml"
L, H, C, T, B = 6, 6, 384, 256, 8  # nanoGPT's recipe for this comparison
LR, MIN_LR, WARMUP, DECAY_STEPS = 1e-3, 1e-4, 100, 1600


# ---- nanoGPT, re-implemented ----
class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, H, C // H).transpose(1, 2) for z in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, C))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(C), Attention(), nn.LayerNorm(C)
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, C), nn.Embedding(T, C)
        self.h = nn.ModuleList(Block() for _ in range(L))
        self.ln_f, self.lm_head = nn.LayerNorm(C), nn.Linear(C, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * L))

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))


def split_tokens(data_dir: Path, split: str) -> np.ndarray:
    from gptlab.data.shards import TokenWindows

    w = TokenWindows(data_dir, split, 1, 1)
    return np.concatenate([np.asarray(s) for s in w.shards]).astype(np.int64)


def run_nanogpt(data_dir: Path, minutes: float, eval_every: int, amp: torch.dtype | None) -> list[tuple[float, float]]:
    from gptlab.data.shards import read_manifest

    man = read_manifest(data_dir)
    bpt = man["splits"]["val"]["bytes"] / man["splits"]["val"]["tokens"]
    train, val = split_tokens(data_dir, "train"), split_tokens(data_dir, "val")
    n_val = (len(val) - 1) // T // B * B  # whole batches of non-overlapping windows, as gptlab evaluates
    torch.manual_seed(1337)
    model = NanoGPT(man["vocab_size"])
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), fused=True)
    ctx = (lambda: torch.autocast("cpu", dtype=amp)) if amp else (lambda: torch.autocast("cpu", enabled=False))

    def lr_at(it):
        if it < WARMUP:
            return LR * (it + 1) / (WARMUP + 1)
        ratio = min(1.0, (it - WARMUP) / (DECAY_STEPS - WARMUP))
        return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)

    @torch.no_grad()
    def val_bpb():
        model.eval()
        total = 0.0
        for i in range(0, n_val, B):
            rows = np.stack([val[(i + j) * T:(i + j) * T + T + 1] for j in range(B)])
            x = torch.from_numpy(rows)
            with ctx():
                total += float(model(x[:, :-1], x[:, 1:]))
        model.train()
        return total / (n_val // B) / math.log(2) / bpt

    curve, train_s, it = [], 0.0, 0
    while train_s < minutes * 60:
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        ix = torch.randint(len(train) - T - 1, (B,))
        x = torch.from_numpy(np.stack([train[i:i + T + 1] for i in ix.tolist()]))
        with ctx():
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        it += 1
        train_s += time.perf_counter() - t0
        if it % eval_every == 0:
            curve.append((train_s, val_bpb()))
            print(f"  nanoGPT step {it}: {train_s:6.1f} s  val bpb {curve[-1][1]:.4f}", flush=True)
    if not curve or curve[-1][0] != train_s:
        curve.append((train_s, val_bpb()))
        print(f"  nanoGPT step {it}: {train_s:6.1f} s  val bpb {curve[-1][1]:.4f}", flush=True)
    return curve


def run_gptlab(recipe: Path, budget: str, out: Path) -> list[tuple[float, float]]:
    cmd = [sys.executable, "-m", "gptlab", "train", str(recipe), "--time-budget", budget, "--out-dir", str(out),
           "--overwrite", "--sample-prompt", ""]
    print("  $ " + " ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    if proc.returncode:
        sys.exit(f"gptlab train failed:\n{proc.stderr[-3000:]}")
    print(f"  whole command {time.perf_counter() - t0:.0f} s (data cached, evaluations and saves included)")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["train_s"], r["val_bpb"]) for r in rows if "val_bpb" in r]
    for s, b in curve:
        print(f"  gptlab {s:6.1f} s  val bpb {b:.4f}")
    return curve


def first_time(curve: list[tuple[float, float]], threshold: float) -> float | None:
    return next((s for s, b in curve if b <= threshold), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", type=Path, default=RECIPE)
    ap.add_argument("--budget", default="4m", help="gptlab's --time-budget (default 4m)")
    ap.add_argument("--ref-minutes", type=float, default=10.0, help="nanoGPT's training time (default 10)")
    ap.add_argument("--eval-every", type=int, default=50, help="nanoGPT steps between evaluations")
    ap.add_argument("--thresholds", default="2.4,2.3,2.2,2.1,2.0,1.95,1.9,1.85,1.8,1.75,1.7,1.683")
    args = ap.parse_args()

    from gptlab.data.shards import ensure_prepared
    from gptlab.train.runtime import bf16_is_fast

    data_dir = ensure_prepared("python-docs", tokenizer=None, vocab_size=4096, cache=ROOT / "out" / "data",
                               val_fraction=0.02)
    amp = torch.bfloat16 if bf16_is_fast(torch.device("cpu")) else None
    print(f"data {data_dir}; {torch.get_num_threads()} threads; precision {'bf16' if amp else 'fp32'}")
    print(f"nanoGPT's recipe ({L}x{C}, context {T}, batch {B}, AdamW {LR:g} cosine over {DECAY_STEPS} steps), "
          f"{args.ref_minutes:g} min of training:")
    ref = run_nanogpt(data_dir, args.ref_minutes, args.eval_every, amp)
    print(f"gptlab, {args.recipe.relative_to(ROOT) if args.recipe.is_relative_to(ROOT) else args.recipe}:")
    with tempfile.TemporaryDirectory() as tmp:
        ours = run_gptlab(args.recipe, args.budget, Path(tmp) / "run")
    print(f"\nbest val bpb: nanoGPT {min(b for _, b in ref):.4f} in {ref[-1][0]:.0f} s, "
          f"gptlab {min(b for _, b in ours):.4f} in {ours[-1][0]:.0f} s of training")
    print(f"{'val bpb <=':>11} {'nanoGPT s':>10} {'gptlab s':>9} {'ratio':>6}")
    for th in sorted({float(x) for x in args.thresholds.split(",")}, reverse=True):
        a, b = first_time(ref, th), first_time(ours, th)
        if a is None and b is None:
            continue
        ratio = f"{a / b:.2f}x" if a is not None and b is not None else ("> " + f"{ref[-1][0] / b:.2f}x" if b else "-")
        shown = lambda v: f"{v:.0f}" if v is not None else "not reached"  # noqa: E731
        print(f"{th:>11.3f} {shown(a):>10} {shown(b):>9} {ratio:>6}")


if __name__ == "__main__":
    main()
