"""`gptlab sample`: rejection sampling (the Qwen2 report's way of building data from a model's own answers).

Each row of the prompts file has `prompt` (text, or chat messages rendered with the chat template) and any
other fields the verifier reads (`answer` for numeric / exact). The model samples `n` completions per
prompt on the batched engine; the verifier (gptlab/eval/rewards.py) scores each one, and a score > 0 passes.

    DIR/sft.jsonl     every passing completion: {"prompt", "completion"} (or {"messages"} for chat rows),
                      ready for `gptlab finetune --task sft`
    DIR/pairs.jsonl   per prompt with both kinds, its first passing completion as `chosen` and its first
                      failing one as `rejected`: ready for `gptlab finetune --task dpo`
    DIR/report.json   per prompt: samples, passed, failed, no verdict; the totals and the pass rate
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from gptlab.data.examples import render_prompt
from gptlab.data.jsonl import read_jsonl
from gptlab.errors import GptlabError
from gptlab.eval.rewards import load_reward, score


def rejection_sample(model_path: str, data: str, out: str | Path, n: int = 8, verify: str = "numeric",
                     max_new_tokens: int = 128, temperature: float = 0.8, top_p: float | None = None,
                     seed: int = 0, batch_size: int = 16, dtype: str | None = None, overwrite: bool = False,
                     progress: bool = True) -> dict[str, Any]:
    from tqdm.auto import tqdm

    import gptlab
    from gptlab.formats.files import check_destination
    from gptlab.infer.generate import engine_for
    from gptlab.infer.sampling import Sampling
    from gptlab.limits import check

    for name, value in (("n", n), ("max_new_tokens", max_new_tokens), ("temperature", temperature),
                        ("batch_size", batch_size)):
        check(name, value)
    if temperature == 0 and n > 1:
        raise GptlabError("--n > 1 with --temperature 0 samples the same completion n times; raise the temperature")
    name, fn = load_reward(verify)
    out = check_destination(out, ("report.json",), "the sample dir", overwrite)
    rows = []
    for line, row in read_jsonl(data):
        if "prompt" not in row:
            raise GptlabError(f"{data}:{line}: no 'prompt' field")
        rows.append((line, row))
    if not rows:
        raise GptlabError(f"{data}: no prompts")
    model = gptlab.load(model_path, dtype=dtype)
    tok = gptlab.load_tokenizer(model_path)
    texts = [render_prompt(tok, row["prompt"], f"{data}:{line}") for line, row in rows]
    start = time.perf_counter()
    sft, pairs, per_prompt = [], [], []
    with tqdm(total=len(rows), desc="sampling", unit="prompt", disable=not progress) as bar:
        for b in range(0, len(rows), batch_size):
            chunk, prompts = rows[b: b + batch_size], texts[b: b + batch_size]
            # a seed per prompt (its n samples take seed + 0 .. n - 1): prompts sharing one seed would share
            # their random draws, and pass or fail together
            ss = [Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, n=n, truncate=True,
                           seed=seed * 1_000_003 + (b + k) * n) for k in range(len(prompts))]
            outs = engine_for(model, tok, [len(tok.encode(p)) for p in prompts], ss[0]).generate(prompts, ss)
            completions = [[o.text for o in r.outputs] for r in outs]
            flat_rows = [row for _, row in chunk for _ in range(n)]
            values = score(name, fn, [row["prompt"] for row in flat_rows], [c for cs in completions for c in cs],
                           flat_rows)
            for k, ((line, row), cs) in enumerate(zip(chunk, completions)):
                verdicts = values[k * n: (k + 1) * n]
                good = [c for c, v in zip(cs, verdicts) if v is not None and v > 0]
                bad = [c for c, v in zip(cs, verdicts) if v is not None and v <= 0]
                chat = isinstance(row["prompt"], list)
                for c in good:
                    sft.append({"messages": row["prompt"] + [{"role": "assistant", "content": c}]} if chat
                               else {"prompt": row["prompt"], "completion": c})
                if good and bad:
                    pairs.append({"prompt": row["prompt"],
                                  "chosen": [{"role": "assistant", "content": good[0]}] if chat else good[0],
                                  "rejected": [{"role": "assistant", "content": bad[0]}] if chat else bad[0]})
                per_prompt.append({"line": line, "samples": n, "passed": len(good), "failed": len(bad),
                                   "no_verdict": n - len(good) - len(bad)})
            bar.update(len(chunk))
    total = len(rows) * n
    passed = sum(p["passed"] for p in per_prompt)
    report = {"model": model_path, "data": data, "verify": verify, "n": n, "temperature": temperature,
              "prompts": len(rows), "samples": total, "passed": passed, "pass_rate": round(passed / total, 4),
              "prompts_with_a_pass": sum(p["passed"] > 0 for p in per_prompt), "sft_rows": len(sft),
              "pairs": len(pairs), "seconds": round(time.perf_counter() - start, 2), "per_prompt": per_prompt}
    out.mkdir(parents=True, exist_ok=True)
    for fname, items in (("sft.jsonl", sft), ("pairs.jsonl", pairs)):
        (out / fname).write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items), encoding="utf-8")
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report
