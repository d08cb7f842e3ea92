"""Serving throughput: gptlab serve vs transformers serve --continuous-batching, same checkpoints, one run.

Builds random-weight checkpoints (a Qwen3-shaped 8 layers x 512; GPT-2 124M's 12 x 768; both with the
8,000-token vocabulary of the tokenizer trained here, so every generated id decodes to text), starts both
servers on loopback, and drives 1, 8 and 32 concurrent streaming completions, alternating the servers round
by round and keeping each one's fastest round (a 32-token prompt,
128 new tokens, greedy) with the official `openai` client. Prints, per server and concurrency: aggregate
generated tokens/s, median time to first token, median inter-token latency, and the ratios.

    python bench/bench_serve.py                      # both models, 1 / 8 / 32 streams
    python bench/bench_serve.py --models qwen3 --streams 1 8 --requests 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(kind: str, root: Path) -> Path:
    """A random-weight HF checkpoint with a byte-level BPE tokenizer and a ChatML template."""
    import torch
    import transformers as T

    from gptlab.data.corpus import corpus_texts
    from gptlab.tokenizer import train_tokenizer

    path = root / kind
    vocab = 8000
    tok = train_tokenizer(corpus_texts("python-docs"), vocab_size=vocab, show_progress=False,
                          special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                         "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                         "{% endif %}")
    torch.manual_seed(0)
    if kind == "qwen3":
        cfg = T.Qwen3Config(vocab_size=vocab, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
                            tie_word_embeddings=True, eos_token_id=0, bos_token_id=0)
    else:
        cfg = T.GPT2Config(vocab_size=vocab, eos_token_id=0, bos_token_id=0)
    model = T.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # spread the logits (as the tests do), so greedy decoding does not sit on one token
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    tok.save(path)
    return path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(server: str, model: Path, port: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    if server == "gptlab":
        cmd = [sys.executable, "-m", "gptlab", "serve", str(model), "--port", str(port), "--max-batch", "32",
               "--log-level", "warning"]
    else:
        exe = shutil.which("transformers") or str(Path(sys.executable).with_name("transformers"))
        cmd = [exe, "serve", str(model), "--continuous-batching", "--port", str(port), "--host", "127.0.0.1",
               "--device", "cpu", "--log-level", "warning"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_up(port: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not come up")


async def one(client, model: str, prompt: str, max_tokens: int) -> tuple[int, float, list[float]]:
    """(tokens, time to first token, gaps between tokens) of one streamed completion."""
    start = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True)
    async for chunk in stream:
        if not chunk.choices or not chunk.choices[0].text:
            continue
        now = time.perf_counter()
        tokens += 1
        if first is None:
            first = now - start
        else:
            gaps.append(now - last)
        last = now
    return tokens, first or 0.0, gaps


async def load(port: int, model: str, streams: int, requests: int, prompt: str, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0,
                                timeout=3600)
    await one(client, model, prompt, 8)  # warm up

    async def worker():
        return [await one(client, model, prompt, max_tokens) for _ in range(requests)]

    t0 = time.perf_counter()
    results = [r for w in await asyncio.gather(*[worker() for _ in range(streams)]) for r in w]
    wall = time.perf_counter() - t0
    await client.close()
    tokens = sum(r[0] for r in results)
    gaps = [g for r in results for g in r[2]]
    return {"tok_s": tokens / wall, "ttft": statistics.median(r[1] for r in results),
            "itl": statistics.median(gaps) if gaps else 0.0, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["qwen3", "gpt2"], choices=["qwen3", "gpt2"])
    ap.add_argument("--servers", nargs="+", default=["gptlab", "transformers"], choices=["gptlab", "transformers"])
    ap.add_argument("--streams", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=2, help="streamed completions per concurrent client")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per server and concurrency")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    prompt = ("The with statement is used to wrap the execution of a block with methods defined by a context "
              "manager, which allows common try except finally usage patterns")
    print(f"{args.threads} threads; prompt ~32 tokens, {args.max_tokens} new tokens, greedy, "
          f"{args.requests} requests per stream", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        table: dict = {}
        for kind in args.models:
            path = build(kind, Path(tmp))
            ports = {server: _port() for server in args.servers}
            procs = {server: start(server, path, ports[server], args.threads) for server in args.servers}
            try:
                for server in args.servers:
                    wait_up(ports[server], procs[server])
                for n in args.streams:
                    for _ in range(args.rounds):  # alternate the servers: a slow spell of the machine hits both
                        for server in args.servers:
                            r = asyncio.run(load(ports[server], str(path), n, args.requests, prompt, args.max_tokens))
                            table.setdefault((kind, server, n), []).append(r)
                    for server in args.servers:
                        r = best(table[(kind, server, n)])
                        print(f"{kind:6s} {server:12s} {n:3d} streams: {r['tok_s']:8.1f} tok/s  "
                              f"ttft {1000 * r['ttft']:7.0f} ms  itl {1000 * r['itl']:6.1f} ms", flush=True)
            finally:
                stop(list(procs.values()))
        print("\nratios (gptlab / transformers aggregate tok/s; gptlab n streams / gptlab 1 stream):")
        for kind in args.models:
            for n in args.streams:
                ours, peer = table.get((kind, "gptlab", n)), table.get((kind, "transformers", n))
                one_stream = table.get((kind, "gptlab", args.streams[0]))
                vs = f"{best(ours)['tok_s'] / best(peer)['tok_s']:.2f}x" if ours and peer else "-"
                scale = f"{best(ours)['tok_s'] / best(one_stream)['tok_s']:.2f}x" if ours and one_stream else "-"
                print(f"  {kind:6s} {n:3d} streams: vs transformers {vs:>7s}   vs our 1 stream {scale:>7s}")


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each server's process group, then SIGKILL what has not exited within a minute."""
    for proc in procs:
        os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def best(rounds: list[dict]) -> dict:
    """The fastest round: other tenants of a shared machine only ever slow a round down."""
    return max(rounds, key=lambda r: r["tok_s"])


if __name__ == "__main__":
    main()
