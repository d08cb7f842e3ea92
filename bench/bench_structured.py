"""What structure costs a gptlab server: constrained vs free decoding, and mixed-adapter vs base-only batches.

One `gptlab serve` of a random-weight Qwen3-shaped checkpoint (bench_serve's 8 x 512, 8,000-token vocabulary)
with three PEFT LoRA adapters (rank 16 on every projection, saved by peft) beside the base. Concurrent
clients (the official `openai` client) send completions at temperature 1 in these workloads, alternated
round by round, each keeping its fastest round:

    free         no constraint (the reference)
    json_schema  response_format json_schema: an object with free-text fields, so replies run long
    regex        structured_outputs regex: words of lowercase letters
    base         requests to the base model (same as free, the adapters' reference)
    mixed        requests cycling over base and the three adapters, so every batch mixes them
    adapter      every request to one adapter

Throughput is generated tokens (the server's usage counts) per second of wall time. Prints tok/s per
workload and the ratios constrained / free and mixed / base.

    python bench/bench_structured.py                   # 8 streams
    python bench/bench_structured.py --streams 1 8 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import _port, best, build, stop, wait_up  # noqa: E402

SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "summary": {"type": "string"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["title", "summary", "tags"], "additionalProperties": False}
REGEX = r"([a-z]{1,12} ){8,200}"
ADAPTERS = ["sql", "poems", "law"]


def adapters(base: Path, root: Path) -> dict[str, Path]:
    import peft
    import torch
    import transformers as T

    out = {}
    for i, name in enumerate(ADAPTERS):
        torch.manual_seed(100 + i)
        model = T.AutoModelForCausalLM.from_pretrained(base)
        cfg = peft.LoraConfig(r=16, lora_alpha=32, init_lora_weights=False,
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        peft.get_peft_model(model, cfg).save_pretrained(root / name)
        out[name] = root / name
    return out


def body(workload: str, i: int, base: str) -> dict:
    b: dict = {"model": base, "temperature": 1.0, "seed": i}
    if workload == "json_schema":
        b["extra_body"] = {"response_format": {"type": "json_schema", "json_schema": {"name": "doc", "schema": SCHEMA}}}
    elif workload == "regex":
        b["extra_body"] = {"structured_outputs": {"regex": REGEX}}
    elif workload == "mixed":
        b["model"] = [base, *ADAPTERS][i % (len(ADAPTERS) + 1)]
    elif workload == "adapter":
        b["model"] = ADAPTERS[0]
    return b


async def load(port: int, base: str, workload: str, streams: int, requests: int, prompt: str, max_tokens: int
               ) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0,
                                timeout=3600)
    await client.completions.create(prompt=prompt, max_tokens=8, **body(workload, 0, base))  # warm (compiles)

    async def worker(w: int) -> int:
        done = 0
        for k in range(requests):
            r = await client.completions.create(prompt=prompt, max_tokens=max_tokens,
                                                **body(workload, w * requests + k, base))
            done += r.usage.completion_tokens
        return done

    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*[worker(w) for w in range(streams)]))
    wall = time.perf_counter() - t0
    await client.close()
    return {"tok_s": tokens / wall, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", nargs="+", type=int, default=[8])
    ap.add_argument("--workloads", nargs="+", default=["free", "json_schema", "regex", "base", "mixed", "adapter"],
                    choices=["free", "json_schema", "regex", "base", "mixed", "adapter"])
    ap.add_argument("--requests", type=int, default=2, help="completions per concurrent client")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    prompt = "Write a short record about the with statement and context managers in Python:"
    print(f"{args.threads} threads; temperature 1, up to {args.max_tokens} new tokens, "
          f"{args.requests} requests per stream", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = build("qwen3", Path(tmp))
        dirs = adapters(path, Path(tmp))
        port = _port()
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "gptlab", "serve", str(path), "--port", str(port), "--max-batch", "32",
               "--log-level", "warning"] + [a for name, d in dirs.items() for a in ("--lora", f"{name}={d}")]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        table: dict = {}
        try:
            wait_up(port, proc)
            for n in args.streams:
                for _ in range(args.rounds):
                    for w in args.workloads:
                        r = asyncio.run(load(port, str(path), w, n, args.requests, prompt, args.max_tokens))
                        table.setdefault((w, n), []).append(r)
                for w in args.workloads:
                    r = best(table[(w, n)])
                    print(f"{w:12s} {n:3d} streams: {r['tok_s']:8.1f} tok/s ({r['tokens']} tokens)", flush=True)
        finally:
            stop([proc])
    print("\nratios:")
    for n in args.streams:
        for w, ref in [("json_schema", "free"), ("regex", "free"), ("mixed", "base"), ("adapter", "base")]:
            if (w, n) in table and (ref, n) in table:
                print(f"  {n:3d} streams: {w} / {ref} {best(table[(w, n)])['tok_s'] / best(table[(ref, n)])['tok_s']:.2f}")


if __name__ == "__main__":
    main()
