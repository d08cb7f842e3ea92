"""Training throughput: gptlab vs transformers' GPT2LMHeadModel on the same GPT-2-style model, one process.

    .venv/bin/python bench/bench_train.py            # fp32 and bf16 (bf16 only where the CPU has it natively)
    .venv/bin/python bench/bench_train.py --steps 6 --rounds 3 --dtypes fp32
    .venv/bin/python bench/bench_train.py --compile --vocab 4096   # adds gptlab under torch.compile (inductor)

Model: 6 layers, 6 heads, 384 wide, context 256, batch 8, GPT-2 vocabulary (50257), no dropout in either.
A step is zero_grad, forward, loss, backward, AdamW step. Each side uses what its users get by default:
transformers: `model(input_ids, labels=input_ids).loss`, `torch.optim.AdamW`; gptlab: the trainer's pieces
(`next_token_loss`: fused chunked head + cross-entropy; `make_optimizer`: fused AdamW, decay on 2-D weights).
bf16 = autocast with fp32 weights for both. The two models alternate in rounds after warm-up steps
(discarded), so machine noise hits both alike; the ratio is the median over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

B, T, V, L, H, C = 8, 256, 50257, 6, 6, 384


def gptlab_step_fn(dtype, compiled: bool = False):
    from gptlab.models.config import Config
    from gptlab.models.model import GPT
    from gptlab.train.loop import LoopConfig
    from gptlab.train.optim import make_optimizer
    from gptlab.train.losses import next_token_loss

    torch.manual_seed(0)
    model = GPT(Config(n_layer=L, n_head=H, n_embd=C, context_length=T, vocab_size=V, dropout=0.0)).train()
    opt = make_optimizer(model.parameters(), LoopConfig(lr=3e-4, weight_decay=0.1), torch.device("cpu"))
    fwd = torch.compile(model) if compiled else model

    def step(x):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss, n = next_token_loss(fwd, {"input_ids": x, "labels": x.roll(-1, dims=1)})
            loss = loss / n
        loss.backward()
        opt.step()
        return loss

    return step


def transformers_step_fn(dtype):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=L, n_head=H, n_embd=C, n_positions=T, vocab_size=V, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)

    def step(x):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        return loss

    return step


def native_bf16() -> tuple[bool, float, float]:
    """Whether bf16 matmuls run at least as fast as fp32 here (CPUs without AVX-512 BF16/AMX emulate them)."""
    rates = []
    for dt in (torch.float32, torch.bfloat16):
        a, b = torch.randn(256, 256, dtype=dt), torch.randn(256, 256, dtype=dt)
        a @ b
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        rates.append(3 * 2 * 256 ** 3 / (time.perf_counter() - t) / 1e9)
    return rates[1] >= 0.8 * rates[0], rates[0], rates[1]


def bench(dtype: str, steps: int, rounds: int, warmup: int, compiled: bool) -> None:
    torch.manual_seed(0)
    x = torch.randint(0, V, (B, T))
    sides = {"transformers": transformers_step_fn(dtype), "gptlab": gptlab_step_fn(dtype)}
    if compiled:
        sides["gptlab+compile"] = gptlab_step_fn(dtype, compiled=True)
    for name, step in sides.items():
        t = time.perf_counter()
        for _ in range(warmup):  # first touches of fresh memory are slow (and compiling): discarded
            step(x)
        if name.endswith("compile"):
            print(f"  {name}: {warmup} warm-up steps (compiling) took {time.perf_counter() - t:.1f} s", flush=True)
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, step in sides.items():
            t = time.perf_counter()
            for _ in range(steps):
                loss = step(x)
            float(loss.detach())  # waits for the last step to finish
            rates[name].append(B * T * steps / (time.perf_counter() - t))
    ratios = [g / h for g, h in zip(rates["gptlab"], rates["transformers"])]
    hf, ours = statistics.median(rates["transformers"]), statistics.median(rates["gptlab"])
    print(f"{dtype}: transformers {hf:,.0f} tok/s   gptlab {ours:,.0f} tok/s   "
          f"ratio {statistics.median(ratios):.2f}x (per round: {', '.join(f'{r:.2f}' for r in ratios)})", flush=True)
    if compiled:
        gain = [c / g for c, g in zip(rates["gptlab+compile"], rates["gptlab"])]
        print(f"{dtype}: gptlab+compile {statistics.median(rates['gptlab+compile']):,.0f} tok/s   "
              f"{statistics.median(gain):.2f}x eager gptlab (per round: {', '.join(f'{r:.2f}' for r in gain)})",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--force-bf16", action="store_true", help="run bf16 even where it is emulated (very slow)")
    ap.add_argument("--compile", action="store_true", help="also time gptlab under torch.compile")
    ap.add_argument("--vocab", type=int, default=50257, help="vocabulary (default GPT-2's 50257; the speedrun's 4096)")
    args = ap.parse_args()
    global V
    V = args.vocab
    torch.set_num_threads(args.threads)
    print(f"GPT-2 style: {L} layers, {H} heads, {C} wide, context {T}, batch {B}, vocab {V}; "
          f"torch {torch.__version__}, {args.threads} threads, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    for dtype in args.dtypes:
        if dtype == "bf16" and not args.force_bf16:
            ok, fp32, bf16 = native_bf16()
            if not ok:
                print(f"bf16: skipped: this CPU emulates bf16 matmuls ({bf16:.1f} GFLOP/s vs {fp32:.1f} fp32); "
                      f"--force-bf16 runs it anyway")
                continue
        bench(dtype, args.steps, args.rounds, args.warmup, args.compile)


if __name__ == "__main__":
    main()
