"""LoRA vs full fine-tuning of the same model: trainable parameters, peak memory and training tokens/s.

    python bench/bench_finetune.py            # GPT-2-small layout (12 layers x 768), 4096-token vocab, seq 256
    python bench/bench_finetune.py --quick    # 4 layers x 256, a smoke run of a few seconds
    python bench/bench_finetune.py --device cuda

Both runs go through `gptlab.train.finetune.finetune` (the one training loop) on the same random-weight model and
the same packed SFT rows, each in its own process so the peak RSS (ru_maxrss) is that method's own; on a GPU
the peak allocated CUDA memory is reported as well. tokens/s is the Trainer's own figure (input tokens per
second of optimizer steps), averaged over the logged intervals after the first (which includes warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    "default": dict(n_layer=12, n_head=12, n_embd=768, context_length=256),
    "quick": dict(n_layer=4, n_head=4, n_embd=256, context_length=128),
}


def prepare(root: Path, size: str) -> None:
    """A random-weight GPT-2-layout model dir with a BPE trained on pydoc text, and instruction rows."""
    import torch

    from gptlab.models.config import Config
    from gptlab.models.model import GPT
    from gptlab.tokenizer import train_tokenizer
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    tok = train_tokenizer(texts, vocab_size=4096, show_progress=False)
    torch.manual_seed(0)
    eos = tok.eos_id
    model = GPT(Config(model_type="gpt2", vocab_size=tok.vocab_size, bos_token_id=eos, eos_token_id=eos,
                       **SIZES[size]))
    gptlab.save(model, root / "model", tokenizer=tok)
    with open(root / "data.jsonl", "w") as f:
        for k in sorted(topics):
            body = topics[k].strip()
            f.write(json.dumps({"instruction": f"Explain the Python topic {k!r}.", "output": body[:600]}) + "\n")


def child(root: Path, method: str, steps: int, device: str, batch_size: int) -> dict:
    """One fine-tuning run; returns its figures (run in a fresh process)."""
    import torch

    from gptlab.train.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(
        data=str(root / "data.jsonl"), method=method, task="sft", pack=True, seq_len=0, val_fraction=0.0,
        lora_targets=["c_attn", "c_proj", "c_fc"], lora_r=8, lora_alpha=16, max_steps=steps,
        batch_size=batch_size, lr=1e-4 if method == "full" else 1e-3, warmup_steps=2, eval_every=0,
        log_every=max(1, steps // 4), out_dir=str(root / f"out-{method}"), device=device, quiet=True,
        precision="fp32" if device == "cpu" else "auto", keep_best=False,
    )
    t0 = time.perf_counter()
    result = finetune(str(root / "model"), cfg)
    wall = time.perf_counter() - t0
    logged = [json.loads(line) for line in (root / f"out-{method}/metrics.jsonl").read_text().splitlines()]
    tps = [r["tok_per_s"] for r in logged if "tok_per_s" in r][1:]
    params = list(result.model.parameters())
    out = {
        "method": method,
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "total": sum(p.numel() for p in params),
        "tok_per_s": sum(tps) / len(tps) if tps else float("nan"),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
        "wall_s": wall,
        "final_loss": result.metrics.get("loss"),
    }
    if torch.cuda.is_available() and device != "cpu":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small model and few steps")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps per method (default 8, quick 8)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", choices=["full", "lora"], help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    steps = args.steps or 8
    if args.child:
        print(json.dumps(child(Path(args.root), args.child, steps, args.device, args.batch_size)))
        return

    size = "quick" if args.quick else "default"
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        root = Path(tmp)
        prepare(root, size)
        rows = []
        for method in ("full", "lora"):
            cmd = [sys.executable, __file__, "--child", method, "--root", str(root), "--steps", str(steps),
                   "--device", args.device, "--batch-size", str(args.batch_size)]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if out.returncode:
                sys.exit(f"{method} run failed:\n{out.stderr[-2000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    import torch

    s = SIZES[size]
    print(f"model: GPT-2 layout, {s['n_layer']} layers x {s['n_embd']}, vocab 4096, seq {s['context_length']}, "
          f"batch {args.batch_size}, {steps} steps, device {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    cols = ["method", "trainable", "total", "tok_per_s", "peak_rss_mib"] + (["peak_cuda_mib"] if "peak_cuda_mib" in rows[0] else [])
    print(" | ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:>14,.0f}" if isinstance(r[c], (int, float)) else f"{r[c]:>14}" for c in cols))
    full, lora = rows
    print(f"lora / full: trainable {lora['trainable'] / full['trainable']:.4f}x, tokens/s "
          f"{lora['tok_per_s'] / full['tok_per_s']:.2f}x, peak RSS {lora['peak_rss_mib'] / full['peak_rss_mib']:.2f}x"
          + (f", peak CUDA {lora['peak_cuda_mib'] / full['peak_cuda_mib']:.2f}x" if "peak_cuda_mib" in full else ""))


if __name__ == "__main__":
    main()
