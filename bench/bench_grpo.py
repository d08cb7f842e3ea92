"""A GRPO step, split into generation and update, for gptlab and TRL's GRPOTrainer on the same model and settings.

    python bench/bench_grpo.py             # 6 layers x 384 GPT-2 layout, 4 prompts x 8 completions x 48 tokens
    python bench/bench_grpo.py --quick     # 2 layers x 128, a smoke run

Both train the same random-weight model (full fine-tuning, fp32, no KL term, one update per rollout) on the same
prompts with the same reward. gptlab samples on its batched engine (paged KV cache, one continuous batch of
all 32 completions); TRL samples with transformers' generate. Rollout tokens/s counts the completion tokens
sampled per second of generation; update time is the rest of the step (log-probs, loss, backward, AdamW).
Each side runs in its own process, one after the other, on the same threads; the first step (warm-up) is
left out of the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {"default": dict(n_layer=6, n_head=6, n_embd=384), "quick": dict(n_layer=2, n_head=2, n_embd=128)}
G, PROMPTS, NEW = 8, 4, 48


def reward(prompts, completions, **kw):
    return [float(len(c) % 3 == 0) for c in completions]  # any cheap, varied reward: the bench times the rest


def prepare(root: Path, size: str) -> None:
    import torch

    from gptlab import save
    from gptlab.models.config import Config
    from gptlab.models.model import GPT
    from gptlab.tokenizer import train_tokenizer
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    tok = train_tokenizer(texts, vocab_size=4096, show_progress=False)
    torch.manual_seed(0)
    cfg = Config(model_type="gpt2", vocab_size=tok.vocab_size, context_length=256, bos_token_id=tok.eos_id,
                 eos_token_id=tok.eos_id, **SIZES[size])
    save(GPT(cfg), root / "model", tokenizer=tok)
    words = " ".join(texts).split()
    rows = [{"prompt": " ".join(words[i * 7: i * 7 + 12])} for i in range(64)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_gptlab(root: Path, steps: int) -> dict:
    from gptlab.train.finetune import FinetuneConfig, finetune

    sys.modules["bench_grpo_reward"] = sys.modules[__name__]
    finetune(str(root / "model"), FinetuneConfig(
        data=str(root / "prompts.jsonl"), task="grpo", method="full", reward=["bench_grpo_reward:reward"],
        num_generations=G, max_new_tokens=NEW, batch_size=PROMPTS, max_steps=steps, lr=1e-5, warmup_steps=0,
        eval_every=0, log_every=1, val_fraction=0.0, out_dir=str(root / "gptlab-run"), quiet=True, precision="fp32"))
    log = [json.loads(x) for x in (root / "gptlab-run" / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]
    gen = [r["generation_s"] for r in log][1:]
    upd = [r["update_s"] for r in log][1:]
    toks = [r["completion_length"] * G * PROMPTS / r["generation_s"] for r in log][1:]
    return {"generation_s": statistics.median(gen), "update_s": statistics.median(upd),
            "rollout_tok_s": statistics.median(toks), "completion_length": statistics.median(r["completion_length"] for r in log)}


def run_trl(root: Path, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = PreTrainedTokenizerFast.from_pretrained(root / "model")
    tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
    rows = [json.loads(x) for x in (root / "prompts.jsonl").read_text().splitlines()]
    args = GRPOConfig(output_dir=str(root / "trl-run"), num_generations=G, max_completion_length=NEW,
                      per_device_train_batch_size=G * PROMPTS, gradient_accumulation_steps=1, max_steps=steps,
                      learning_rate=1e-5, warmup_steps=0, beta=0.0, temperature=1.0, use_cpu=True, bf16=False,
                      report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tok)
    gen_times, step_times = [], []
    original = trainer._generate

    def timed(*a, **kw):
        t = time.perf_counter()
        out = original(*a, **kw)
        gen_times.append(time.perf_counter() - t)
        return out

    trainer._generate = timed

    class Steps(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **kw):
            step_times.append(time.perf_counter() - self.t)

    trainer.add_callback(Steps())
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    gen, steps_ = gen_times[1:], step_times[1:]
    return {"generation_s": statistics.median(gen), "update_s": statistics.median(s - g for s, g in zip(steps_, gen)),
            "rollout_tok_s": statistics.median(n * G * PROMPTS / g for n, g in zip(lengths[1:], gen)),
            "completion_length": statistics.median(lengths)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--side", choices=["gptlab", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        out = (run_gptlab if a.side == "gptlab" else run_trl)(Path(a.root), a.steps)
        print("RESULT " + json.dumps(out))
        return
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root, "quick" if a.quick else "default")
        results = {}
        for side in ("gptlab", "trl"):
            p = subprocess.run([sys.executable, __file__, "--side", side, "--root", str(root), "--steps", str(a.steps)],
                               capture_output=True, text=True)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode or not line:
                sys.exit(f"{side} failed:\n{p.stderr[-3000:]}")
            results[side] = json.loads(line[0][7:])
    size = SIZES["quick" if a.quick else "default"]
    print(f"GRPO step: {PROMPTS} prompts x {G} completions x up to {NEW} tokens, GPT-2 layout {size['n_layer']} x "
          f"{size['n_embd']}, fp32, {torch.get_num_threads()} threads, medians of {a.steps - 1} steps")
    print(f"{'':10} {'generation s':>13} {'update s':>9} {'rollout tok/s':>14} {'tokens/completion':>18}")
    for side, r in results.items():
        print(f"{side:10} {r['generation_s']:13.3f} {r['update_s']:9.3f} {r['rollout_tok_s']:14.0f} "
              f"{r['completion_length']:18.1f}")
    g, t = results["gptlab"], results["trl"]
    print(f"gptlab / TRL: rollout tok/s {g['rollout_tok_s'] / t['rollout_tok_s']:.2f}x, generation time "
          f"{t['generation_s'] / g['generation_s']:.2f}x less, update time {t['update_s'] / g['update_s']:.2f}x less")


if __name__ == "__main__":
    main()
