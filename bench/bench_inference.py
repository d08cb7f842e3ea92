"""gptlab vs transformers inference speed on the same random-weight GPT-2 124M, in one process run.

    python bench/bench_inference.py                 # decode fp32, bf16, int8, int4; forward 8x1024
    python bench/bench_inference.py --quick         # fewer tokens, for a smoke run
    python bench/bench_inference.py --long          # + decode after 1K and 4K tokens of context, rotary model
    GPTLAB_ISA=avx2 python bench/bench_inference.py # the AVX2 kernels on an AVX-512 machine (gptlab/kernels)

Batch-1 decode: 32-token prompt, 128 new tokens, greedy (both stop only at max_new_tokens). Forward
throughput: 8 x 1024 tokens, no grad. Prints tokens/s for each and gptlab / transformers; int8 and int4
(gptlab's weight-only schemes: transformers has no CPU kernel for them) are compared with transformers fp32.
Decode reads every weight once per token, so its limit is the machine's read bandwidth (measured first: a
sum over 1 GiB, best of 3) over the bytes of weights a token reads; each gptlab decode figure is also printed
as a share of that limit. GPTLAB_KERNELS=0 runs gptlab on plain F.linear (see gptlab/kernels).

--long: a rotary, grouped-query model (Qwen3's layout at GPT-2 small's size: 12 layers, 768 wide, 12 query and
4 key-value heads, vocabulary 32,000), bf16, decode of 32 tokens after a prompt of 1,024 and 4,096 tokens (the
prefill is timed apart and left out); the limit then counts the KV cache a token reads as well as the weights,
and "attention" is the share of the decode time that the long context adds over a 64-token context.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def read_bandwidth() -> float:
    """Bytes per second a multithreaded sum over a 1 GiB buffer reads (best of 3)."""
    buf = torch.ones(1 << 28)  # 1 GiB of fp32
    buf.sum()
    best = min(_median_time(buf.sum, 1) for _ in range(3))
    return buf.numel() * 4 / best


def decode_bytes(model) -> int:
    """Weight bytes one decode step reads: every parameter and quantized buffer but the tables it only looks a row
    up in (positions; the embedding when the head does not read it as its weight)."""
    from gptlab.models.quant import QuantLinear

    looked_up = ("wpe",) if model.lm_head.weight is model.wte.weight else ("wpe", "wte")  # rows, not the whole
    n = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if not name.startswith(looked_up))
    return n + sum(m.qweight.numel() + m.scales.numel() * 4 for m in model.modules() if isinstance(m, QuantLinear))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs (smoke test, noisy numbers)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--quantize", default="int8,int4", help="gptlab's integer schemes ('' = none)")
    ap.add_argument("--skip-forward", action="store_true")
    ap.add_argument("--long", action="store_true", help="also decode after 1K and 4K tokens of context (rotary model)")
    ap.add_argument("--only-long", action="store_true", help="only the --long part")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    import gptlab
    from gptlab.infer.generate import generate_ids

    torch.manual_seed(0)
    hf_fp32 = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()  # 124M, random weights
    path = tempfile.mkdtemp(prefix="bench-gpt2-")
    hf_fp32.save_pretrained(path)
    new_tokens = 32 if args.quick else 128
    repeats = 1 if args.quick else 3
    prompt = torch.randint(0, 50257, (1, 32), generator=torch.Generator().manual_seed(0))
    print(f"GPT-2 124M, random weights, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    from gptlab import kernels

    print("gptlab cpu kernels: " + kernels.summary())
    bw = read_bandwidth()
    print(f"read bandwidth: {bw / 1e9:.1f} GB/s (sum over 1 GiB, {torch.get_num_threads()} threads)")
    print(f"{'benchmark':<34}{'transformers tok/s':>20}{'gptlab tok/s':>16}{'ratio':>8}  gptlab share of limit",
          flush=True)

    def report(label: str, a: float, b: float, limit: float | None = None) -> None:
        share = f"  {100 * b / limit:.0f}% of {limit:.0f} tok/s" if limit else ""
        print(f"{label:<34}{a:>20.1f}{b:>16.1f}{b / a:>7.2f}x{share}", flush=True)

    if args.long or args.only_long:
        long_context(bw, report, args.quick)
    if args.only_long:
        return
    schemes = [(n, None) for n in args.dtypes.split(",") if n] + [("float32", q) for q in args.quantize.split(",") if q]
    hf_times: dict[str, float] = {}
    for name, quant in schemes:
        dtype = getattr(torch, name)
        hf = hf_fp32.to(dtype)
        ours = gptlab.load(path, dtype=dtype, quantize=quant)
        label = quant or name

        def run_hf():
            with torch.inference_mode():
                hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=0)

        def run_ours():
            generate_ids(ours, [prompt[0].tolist()], max_new_tokens=new_tokens, eos_id=[])

        run_ours()  # warm-up: first use of memory in a fresh process is slow
        if name not in hf_times:  # the integer schemes compare with transformers at their activations' dtype
            run_hf()
            hf_times[name] = _median_time(run_hf, repeats)
        t_hf, t_ours = hf_times[name], _median_time(run_ours, repeats)
        vs = f" (vs {name})" if quant else ""
        report(f"decode b=1 {label}{vs}", new_tokens / t_hf, new_tokens / t_ours, bw / decode_bytes(ours))

        if not args.skip_forward:
            x = torch.randint(0, 50257, (8, 256 if args.quick else 1024), generator=torch.Generator().manual_seed(1))

            def fwd_hf():
                with torch.inference_mode():
                    hf(x)

            def fwd_ours():
                with torch.inference_mode():
                    ours(x)

            fwd_hf(), fwd_ours()
            t_hf, t_ours = _median_time(fwd_hf, repeats), _median_time(fwd_ours, repeats)
            report(f"forward {x.shape[0]}x{x.shape[1]} {label}{vs}", x.numel() / t_hf, x.numel() / t_ours)


def long_context(bw: float, report, quick: bool) -> None:
    """Decode after long prompts on a Qwen3-layout model, gptlab vs transformers, bf16."""
    import transformers

    import gptlab
    from gptlab.infer.generate import engine_for
    from gptlab.infer.sampling import Sampling

    cfg = transformers.Qwen3Config(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                   num_attention_heads=12, num_key_value_heads=4, head_dim=64,
                                   max_position_embeddings=8192, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(cfg).eval().to(torch.bfloat16)
    path = tempfile.mkdtemp(prefix="bench-qwen3-")
    hf.save_pretrained(path)
    ours = gptlab.load(path, dtype=torch.bfloat16)
    n = 8 if quick else 32
    weights = sum(p.numel() * p.element_size() for name, p in ours.named_parameters() if name != "wte.weight")
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2  # K and V, bf16 bytes
    print(f"\nlong context: Qwen3 layout, 12 x 768, 12 / 4 heads, vocab 32,000, bf16; decode {n} tokens after the "
          f"prompt (prefill timed apart)", flush=True)

    def hf_decode(prompt) -> float:
        """tokens/s of n greedy single-token forwards after the prompt's prefill (its KV cache kept)."""
        with torch.inference_mode():
            out = hf(prompt, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(n):
                out = hf(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            return n / (time.perf_counter() - t0)

    def our_decode(prompt) -> float:
        """tokens/s of n engine steps after the step that prefilled the prompt and sampled its first token."""
        s = Sampling(max_new_tokens=n + 1, eos_id=[])
        engine = engine_for(ours, None, [prompt.shape[1]], s)
        rid = engine.add_request(prompt[0].tolist(), s)
        while not engine.output(rid).outputs[0].token_ids:
            engine.step()
        t0 = time.perf_counter()
        for _ in range(n):
            engine.step()
        return n / (time.perf_counter() - t0)

    short = None
    for length in (64, 1024, 4096):
        prompt = torch.randint(0, 32000, (1, length), generator=torch.Generator().manual_seed(length))
        a, b = hf_decode(prompt), our_decode(prompt)
        limit = bw / (weights + kv_per_token * length)
        short = short or 1 / b
        report(f"decode after {length} bf16", a, b, limit)
        if length > 64:
            print(" " * 34 + f"(the context adds {100 * (1 - short * b):.0f}% to gptlab's time per token)", flush=True)


if __name__ == "__main__":
    main()
