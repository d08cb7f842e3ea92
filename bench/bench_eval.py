"""gptlab's evaluator vs lm-evaluation-harness's `hf` model: same random-weight GPT-2 124M, same requests.

    python bench/bench_eval.py                  # 64 HellaSwag-shaped questions + 4 documents, fp32
    python bench/bench_eval.py --quick          # 16 questions, 1 document, one round (smoke run, noisy)

Multiple choice: a ~60-word context and 4 endings of 8-30 words per question (HellaSwag's shape), scored
by `HFLM.loglikelihood` and by `gptlab.eval.multiple_choice` (both tokenise the same strings). Rolling
perplexity: documents of ~6,000 characters through `HFLM.loglikelihood_rolling` and
`gptlab.eval.perplexity` (disjoint 1024-token windows). Both run the same batch size; the harness's time
is its model's calls only (no task or dataset set-up). The two alternate for --rounds rounds and each keeps
its best time, so load from other processes hits both alike. Prints examples/s and tokens/s (the request
tokens the harness feeds, the same count for both) and the ratio, after checking that the numbers agree.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few examples (smoke test, noisy numbers)")
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="alternating repeats; the best time of each counts")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    if args.quick:
        args.questions, args.docs, args.rounds = 16, 1, 1
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    import gptlab
    from gptlab.eval.multiple_choice import evaluate_multiple_choice
    from gptlab.eval.perplexity import evaluate_perplexity
    from gptlab.eval.scorer import Scorer
    from gptlab.tokenizer import train_tokenizer

    text = _corpus()
    tok = train_tokenizer([text], vocab_size=8192, show_progress=False)
    torch.manual_seed(0)
    config = transformers.GPT2Config(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)  # 124M, vocab 50257
    path = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(path)
    tok.save(path)

    # HellaSwag-shaped questions from pydoc sentences
    flat = re.sub(r"\s+", " ", text)
    sents = [s for s in re.split(r"(?<=[.!?]) ", flat) if 8 <= len(s.split()) <= 30]
    rng = random.Random(0)
    questions = []
    for _ in range(args.questions):
        context = " ".join(" ".join(rng.choice(sents) for _ in range(3)).split()[:60])
        choices = [rng.choice(sents) for _ in range(4)]
        questions.append({"context": context, "choices": choices, "label": rng.randrange(4)})
    docs = [{"text": flat[i * 6000: (i + 1) * 6000]} for i in range(args.docs)]

    dtype = getattr(torch, args.dtype)
    hf = HFLM(pretrained=str(path), device="cpu", batch_size=args.batch_size, dtype=args.dtype)
    ours = Scorer(gptlab.load(path, dtype=dtype), gptlab.load_tokenizer(path), batch_size=args.batch_size,
                  progress=False)
    pairs = [(q["context"], " " + c) for q in questions for c in q["choices"]]
    mc_tokens = sum(len(c) + len(x) for c, x in (ours.encode_pair(*p) for p in pairs))
    roll_tokens = sum(len(ours.encode(d["text"])) for d in docs)

    # warm-up (first use of memory and kernels is slow): a few requests through each
    hf.loglikelihood([Instance("loglikelihood", {}, p, 0) for p in pairs[:8]], disable_tqdm=True)
    evaluate_multiple_choice(ours, questions[:2])

    mc_instances = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    roll_instances = [Instance("loglikelihood_rolling", {}, (d["text"],), i) for i, d in enumerate(docs)]
    best = {"hf_mc": float("inf"), "ours_mc": float("inf"), "hf_roll": float("inf"), "ours_roll": float("inf")}

    def timed(key, fn):
        t0 = time.perf_counter()
        out = fn()
        best[key] = min(best[key], time.perf_counter() - t0)
        return out

    for _ in range(args.rounds):
        hf_mc = timed("hf_mc", lambda: hf.loglikelihood(mc_instances, disable_tqdm=True))
        r_mc = timed("ours_mc", lambda: evaluate_multiple_choice(ours, questions))
        hf_roll = timed("hf_roll", lambda: hf.loglikelihood_rolling(roll_instances, disable_tqdm=True))
        r_roll = timed("ours_roll", lambda: evaluate_perplexity(ours, docs))
    t_hf_mc, t_ours_mc, t_hf_roll, t_ours_roll = best["hf_mc"], best["ours_mc"], best["hf_roll"], best["ours_roll"]

    # the speed only counts if the numbers are the harness's
    ours_lls = [ll for s in r_mc.samples for ll in s["loglikelihoods"]]
    mc_err = max(abs(a - b[0]) / abs(b[0]) for a, b in zip(ours_lls, hf_mc))
    roll_err = max(abs(s["loglikelihood"] - h) / abs(h) for s, h in zip(r_roll.samples, hf_roll))

    print(f"GPT-2 124M (random weights, tokenizer vocab {tok.vocab_size}), {args.dtype}, {torch.get_num_threads()} "
          f"threads, batch size {args.batch_size}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{'task':<28} {'harness hf':>22} {'gptlab':>22} {'gptlab/harness':>15}")
    for name, n, unit, tokens, th, tg in (
        (f"multiple choice ({len(questions)} q x 4)", len(questions), "q/s", mc_tokens, t_hf_mc, t_ours_mc),
        (f"rolling perplexity ({len(docs)} docs)", len(docs), "docs/s", roll_tokens, t_hf_roll, t_ours_roll),
    ):
        print(f"{name:<28} {n / th:8.2f} {unit:<6} {tokens / th:6.0f} tok/s {n / tg:8.2f} {unit:<6} "
              f"{tokens / tg:6.0f} tok/s {th / tg:14.2f}x")
    print(f"max relative difference of loglikelihoods: multiple choice {mc_err:.1e}, rolling {roll_err:.1e}")


if __name__ == "__main__":
    main()
