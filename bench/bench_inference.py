"""gptlab vs transformers inference speed on the same random-weight GPT-2 124M, in one process run.

    python bench/bench_inference.py                 # decode fp32, bf16, int8, int4; forward 8x1024
    python bench/bench_inference.py --quick         # fewer tokens, for a smoke run

Batch-1 decode: 32-token prompt, 128 new tokens, greedy (both stop only at max_new_tokens). Forward
throughput: 8 x 1024 tokens, no grad. Prints tokens/s for each and gptlab / transformers; int8 and int4
(gptlab's weight-only schemes: transformers has no CPU kernel for them) are compared with transformers fp32.
Decode reads every weight once per token, so its limit is the machine's read bandwidth (measured first: a
sum over 1 GiB, best of 3) over the bytes of weights a token reads; each gptlab decode figure is also printed
as a share of that limit. GPTLAB_KERNELS=0 runs gptlab on plain F.linear (see gptlab/kernels).
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
    print(f"{'benchmark':<28}{'transformers tok/s':>20}{'gptlab tok/s':>16}{'ratio':>8}  gptlab share of limit",
          flush=True)

    def report(label: str, a: float, b: float, limit: float | None = None) -> None:
        share = f"  {100 * b / limit:.0f}% of {limit:.0f} tok/s" if limit else ""
        print(f"{label:<28}{a:>20.1f}{b:>16.1f}{b / a:>7.2f}x{share}", flush=True)

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


if __name__ == "__main__":
    main()
