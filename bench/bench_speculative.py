"""Speculative decoding: batch-1 greedy decode with and without a distilled draft, and the draft's acceptance rate.

    python bench/bench_speculative.py                          # train both models in out/bench-speculative, then time
    python bench/bench_speculative.py --target DIR --draft DIR # time models you already have
    python bench/bench_speculative.py --quick                  # small models, short runs: a smoke run

The models, each made by a gptlab command (run as a subprocess and printed; skipped when its output exists):

1. the target: `gptlab train` on the embedded python-docs corpus (a 4096-token BPE trained there),
   6 layers x 384 wide (GPT-2 layout), context 128, batches of 16 x 128 tokens, for --target-minutes;
2. the draft's starting point: `gptlab train` of 2 layers x 128 on the same corpus with the target's tokenizer,
   for --student-minutes;
3. distillation rows: the target's own samples (temperature 1) of prompts cut from the corpus, as
   {"text"} rows: the draft learns what the target says, where speculative decoding will ask it to guess;
4. the draft: `gptlab finetune STUDENT --task distill --teacher TARGET --method full` on those rows, for
   --distill-minutes (the generalised JSD against the target's whole next-token distribution).

Then, in this process, on --threads threads: batch-1 greedy decode of --prompts prompts (32 tokens each, cut
from the pydoc topic pages the distillation rows did not start from) for --new-tokens tokens each, one request at a time, best of --repeats: through the engine
without the draft, with it for each k in --k, through what `gptlab generate --draft` runs (engine_for), and
through `speculative_generate` (the dense one-sequence reference). Every path's tokens are checked equal to
the plain engine's. Prints tokens/s, the acceptance rate, tokens per target pass and the speed-up; never
passes or fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SIZES = {"default": (dict(n_layer=6, n_head=6, n_embd=384), dict(n_layer=2, n_head=4, n_embd=128)),
         "quick": (dict(n_layer=2, n_head=4, n_embd=128), dict(n_layer=1, n_head=2, n_embd=64))}


def gptlab(*args: str) -> None:
    cmd = [sys.executable, "-m", "gptlab", *args]
    print("$ gptlab " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def model_flags(size: dict) -> list[str]:
    return [f"--model.{k.replace('_', '-')}={v}" for k, v in size.items()] + ["--model.context-length=128",
                                                                               "--batch-size=16"]


def make_models(out: Path, quick: bool, minutes: tuple[float, float, float], threads: int) -> tuple[Path, Path]:
    target_size, draft_size = SIZES["quick" if quick else "default"]
    target, student, draft = out / "target" / "final", out / "student" / "final", out / "draft" / "final"
    common = ["--data-cache", str(out / "data"), "--quiet", "--sample-tokens", "0"]
    if not target.exists():
        gptlab("train", "--out-dir", str(out / "target"), "--time-budget", f"{minutes[0]:g}m", *model_flags(target_size),
               *common)
    if not student.exists():
        gptlab("train", "--out-dir", str(out / "student"), "--time-budget", f"{minutes[1]:g}m", "--tokenizer",
               str(target), *model_flags(draft_size), *common)
    rows = out / "distill.jsonl"
    if not rows.exists():
        write_target_samples(target, rows, n=64 if quick else 384, threads=threads)
    if not draft.exists():
        gptlab("finetune", str(student), "--task", "distill", "--teacher", str(target), "--data", str(rows),
               "--method", "full", "--out-dir", str(out / "draft"), "--time-budget", f"{minutes[2]:g}m",
               "--lr", "1e-3", "--batch-size", "16", "--val-fraction", "0.05", "--quiet")
    return target, draft


def corpus_prompts(tok, n: int, length: int, odd: bool) -> list[list[int]]:
    """Prompts of `length` tokens: the starts of the pydoc topic pages at even (distillation) or odd (timing)
    places, in turn."""
    from pydoc_data.topics import topics

    pages = [topics[k] for k in sorted(topics)][int(odd)::2]
    picked = [tok.encode(pages[i % len(pages)])[:length] for i in range(n)]
    return [p for p in picked if len(p) == length]


def write_target_samples(target: Path, rows: Path, n: int, threads: int) -> None:
    """n samples of the target (temperature 1, 16-token prompts, 96 new tokens) as {"text"} rows."""
    import torch

    import gptlab
    from gptlab.infer.engine import Engine, EngineConfig
    from gptlab.infer.sampling import Sampling

    torch.set_num_threads(threads)
    model, tok = gptlab.load(target), gptlab.load_tokenizer(target)
    prompts = corpus_prompts(tok, n, 16, odd=False)
    engine = Engine(model, tok, EngineConfig(max_batch=64, max_waiting=len(prompts), num_blocks=64 * 8))
    start = time.perf_counter()
    outs = engine.generate(prompts, [Sampling(max_new_tokens=96, temperature=1.0, seed=i) for i in range(len(prompts))])
    print(f"sampled {len(outs)} rows from the target in {time.perf_counter() - start:.0f} s", flush=True)
    rows.write_text("".join(json.dumps({"text": tok.decode(p) + o.outputs[0].text}) + "\n"
                            for p, o in zip(prompts, outs)))


def val_loss(model_dir: Path, what: str) -> str:
    """The last validation loss its run logged, if it was trained here."""
    log = Path(model_dir).parent / "metrics.jsonl"
    rows = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
    rows = [r for r in rows if "val_loss" in r]
    return f", {what} {rows[-1]['val_loss']:.2f} after {rows[-1]['step']} steps" if rows else ""


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def bench(target_dir: Path, draft_dir: Path, args) -> None:
    import torch

    import gptlab
    from gptlab.infer.engine import Engine, EngineConfig
    from gptlab.infer.generate import engine_for
    from gptlab.infer.sampling import Sampling
    from gptlab.infer.speculative import load_draft, speculative_generate

    torch.set_num_threads(args.threads)
    target, tok = gptlab.load(target_dir), gptlab.load_tokenizer(target_dir)
    draft = load_draft(str(draft_dir), target, tok)
    prompts = corpus_prompts(tok, args.prompts, 32, odd=True)
    s = Sampling(max_new_tokens=args.new_tokens, eos_id=[])  # greedy, every request runs its whole length
    tokens = len(prompts) * args.new_tokens
    params = {n: sum(p.numel() for p in m.parameters()) / 1e6 for n, m in (("target", target), ("draft", draft))}
    print(f"\ntarget {target_dir}: {params['target']:.2f}M parameters ({target.config.n_layer} layers x "
          f"{target.config.n_embd}{val_loss(target_dir, 'val loss')}); draft {draft_dir}: {params['draft']:.2f}M "
          f"({draft.config.n_layer} x {draft.config.n_embd}{val_loss(draft_dir, 'distillation JSD')}); "
          f"vocabulary {target.config.vocab_size}")
    print(f"batch-1 greedy decode: {len(prompts)} prompts x 32 tokens, {args.new_tokens} new tokens each, one at a "
          f"time, fp32, {torch.get_num_threads()} thread(s), best of {args.repeats}\n")

    def one_by_one(make_engine):
        def run():
            engine = make_engine()
            outs = [engine.generate([p], s)[0].outputs[0].token_ids for p in prompts]
            return outs, engine.stats()
        return run

    cfg = dict(max_batch=1, num_blocks=-(-(32 + args.new_tokens) // 16) + 1, max_waiting=1)
    rows = []
    seconds, (ref, _) = timed(one_by_one(lambda: Engine(target, tok, EngineConfig(**cfg))), args.repeats)
    base = tokens / seconds
    rows.append(("engine, no draft", base, None, None, True))
    seconds, _ = timed(one_by_one(lambda: Engine(draft, tok, EngineConfig(**cfg))), args.repeats)
    rows.append(("engine, the draft alone", tokens / seconds, None, None, None))
    for k in args.k:
        seconds, (outs, st) = timed(one_by_one(lambda: Engine(target, tok, EngineConfig(**cfg, draft_tokens=k),
                                                              draft=draft)), args.repeats)
        rows.append((f"engine + draft, k={k}", tokens / seconds, st["spec_accepted_tokens"] / st["spec_draft_tokens"],
                     (st["spec_accepted_tokens"] + st["spec_drafts"]) / st["spec_drafts"], outs == ref))
    k = args.k[-1]

    def command():  # what `gptlab generate --draft` runs for one prompt
        outs = []
        for p in prompts:
            engine = engine_for(target, tok, [len(p)], s, draft, k)
            outs.append(engine.generate([p], s)[0].outputs[0].token_ids)
        return outs, engine.stats()

    seconds, (outs, st) = timed(command, args.repeats)
    rows.append((f"gptlab generate --draft, k={k}", tokens / seconds, None, None, outs == ref))

    def dense():
        return [speculative_generate(target, draft, p, max_new_tokens=args.new_tokens, k=k) for p in prompts]

    seconds, outs = timed(dense, args.repeats)
    kept, made, passes = (sum(getattr(o, a) for o in outs) for a in ("accepted", "proposed", "rounds"))
    rows.append((f"speculative_generate (dense), k={k}", tokens / seconds, kept / made, tokens / passes,
                 [o.token_ids for o in outs] == ref))
    print(f"{'path':<36} {'tok/s':>8} {'speed-up':>9} {'accepted':>9} {'tok/pass':>9} {'same tokens':>12}")
    for name, rate, acc, per, same in rows:
        print(f"{name:<36} {rate:8.1f} {rate / base:8.2f}x {'' if acc is None else f'{100 * acc:8.1f}%':>9} "
              f"{'' if per is None else f'{per:9.2f}':>9} {'' if same is None else ('yes' if same else 'NO'):>12}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/bench-speculative", help="where the models are trained (and reused)")
    p.add_argument("--target", help="a trained target model dir (skips the training)")
    p.add_argument("--draft", help="its draft model dir (with --target)")
    p.add_argument("--quick", action="store_true", help="small models and short runs: a smoke run")
    p.add_argument("--target-minutes", type=float, default=15)
    p.add_argument("--student-minutes", type=float, default=3)
    p.add_argument("--distill-minutes", type=float, default=5)
    p.add_argument("--k", type=int, nargs="+", default=[2, 4], help="draft tokens per step to time")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    import torch

    args.threads = args.threads or torch.get_num_threads()
    if (args.target is None) != (args.draft is None):
        p.error("pass --target and --draft together, or neither")
    if args.target is not None:
        target, draft = Path(args.target), Path(args.draft)
    else:
        minutes = (0.5, 0.3, 0.5) if args.quick else (args.target_minutes, args.student_minutes, args.distill_minutes)
        target, draft = make_models(Path(args.out), args.quick, minutes, args.threads)
    bench(target, draft, args)


if __name__ == "__main__":
    main()
