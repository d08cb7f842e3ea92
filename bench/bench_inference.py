"""gptlab vs transformers inference speed on the same random-weight GPT-2 124M, in one process run.

    python bench/bench_inference.py                 # decode fp32 + bf16, forward 8x1024 fp32 + bf16
    python bench/bench_inference.py --quick         # fewer tokens, for a smoke run

Batch-1 decode: 32-token prompt, 128 new tokens, greedy (both stop only at max_new_tokens). Forward
throughput: 8 x 1024 tokens, no grad. Prints tokens/s for each and gptlab / transformers.
GPTLAB_KERNELS=0 runs gptlab on plain F.linear (see gptlab/kernels), to show what the kernels add.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs (smoke test, noisy numbers)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dtypes", default="float32,bfloat16")
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
    print(f"{'benchmark':<28}{'transformers tok/s':>20}{'gptlab tok/s':>16}{'ratio':>8}", flush=True)

    def report(label: str, a: float, b: float) -> None:
        print(f"{label:<28}{a:>20.1f}{b:>16.1f}{b / a:>7.2f}x", flush=True)

    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        hf = hf_fp32.to(dtype)
        ours = gptlab.load(path, dtype=dtype)

        def run_hf():
            with torch.inference_mode():
                hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=0)

        def run_ours():
            generate_ids(ours, [prompt[0].tolist()], max_new_tokens=new_tokens, eos_id=[])

        run_hf(), run_ours()  # warm-up: first use of memory in a fresh process is slow
        t_hf, t_ours = _median_time(run_hf, repeats), _median_time(run_ours, repeats)
        report(f"decode b=1 {name}", new_tokens / t_hf, new_tokens / t_ours)

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
            report(f"forward {x.shape[0]}x{x.shape[1]} {name}", x.numel() / t_hf, x.numel() / t_ours)
        del ours


if __name__ == "__main__":
    main()
