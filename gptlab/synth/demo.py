"""`gptlab synth demo`: the domain-QA workflow end to end on the built-in rule book, about 10 minutes on 2 CPU cores.

    1. docs/       the rule book (gptlab/synth/rulebook: a fictional bank's rules, English and Chinese pages)
    2. qa/         `synth qa --teacher extractive`: numeric question-answer pairs, train / test split by pair
    3. base/       a small GPT-2 pretrained on python-docs and the rule book's text (`gptlab train`, shorter),
                   or --base MODEL
    4. tuned/      LoRA SFT of the base on qa/train.jsonl (`gptlab finetune --method lora --task sft`),
                   merged into tuned/merged
    5. report/     `gptlab compare base tuned/merged --tasks qa=qa/test.jsonl --chat`: lenient and strict scores
                   before and after, the questions fixed and broken, a chart

Each step is the public command's own function, so what the demo measures is what a user gets.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

RULEBOOK = Path(__file__).parent / "rulebook"


def base_corpus(docs: Path, path: Path, repeats: int = 20) -> Path:
    """python-docs, and each page of the rule book `repeats` times (~3% of the characters), as a JSONL corpus.

    The rule book's text is in the base model's pretraining: continued pretraining on the domain's documents
    is the usual first step, and here it is also the only Chinese on the machine; a model that never saw a
    script cannot pick it up through a LoRA adapter, which leaves the embeddings frozen.
    """
    from gptlab.data import pydocs
    from gptlab.synth.documents import read_documents

    pages = [p.text for p in read_documents([str(docs)])]
    with path.open("w", encoding="utf-8") as f:
        for text in [*pydocs.documents(), *(pages * repeats)]:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


def run_demo(out: str | Path, base: str | None = None, base_steps: int = 600, tune_steps: int = 1200,
             pairs_per_page: int = 40,
             lora_r: int = 64, lr: float = 5e-3, seed: int = 0, overwrite: bool = False,
             progress: bool = True) -> dict[str, Any]:
    from gptlab.eval.compare import compare, write_report
    from gptlab.formats.files import check_destination
    from gptlab.limits import check
    from gptlab.synth.qa import synth_qa
    from gptlab.train.finetune import FinetuneConfig, finetune
    from gptlab.train.pretrain import TrainConfig, run_pretraining

    for name, value in (("max_steps", base_steps), ("max_steps", tune_steps), ("pairs_per_page", pairs_per_page),
                        ("lora_r", lora_r), ("lr", lr)):
        check(name, value)
    out = check_destination(out, ("demo.json",), "the demo dir", overwrite)
    times: dict[str, float] = {}
    t0 = time.perf_counter()

    def step(name: str, started: float) -> None:
        times[name] = round(time.perf_counter() - started, 1)
        if progress:
            print(f"[demo] {name}: {times[name]:.0f} s", flush=True)

    docs = out / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    for f in sorted(RULEBOOK.glob("*.md")):
        shutil.copyfile(f, docs / f.name)

    t = time.perf_counter()
    qa = synth_qa([str(docs)], out / "qa", teacher="extractive", pairs_per_page=pairs_per_page, seed=seed,
                  overwrite=True, progress=progress)
    step("synth qa", t)

    t = time.perf_counter()
    if base is None:
        corpus = base_corpus(docs, out / "base-corpus.jsonl")
        # the recipe the demo's figures were measured with (docs/domain-qa.md), whatever `gptlab train` defaults to
        run_pretraining(TrainConfig(data=str(corpus), out_dir=str(out / "base"), max_steps=base_steps, eval_every=0,
                                    seed=seed, data_cache=str(out / "data"), overwrite=True, quiet=not progress,
                                    sample_prompt="", optimizer="adamw"))
        base = str(out / "base" / "final")
    step("base model", t)

    t = time.perf_counter()
    cfg = FinetuneConfig(data=str(out / "qa" / "train.jsonl"), val_fraction=0.0, method="lora", task="sft",
                         lora_targets=["all-linear"], lora_r=lora_r, lora_alpha=float(lora_r), max_steps=tune_steps,
                         batch_size=16, lr=lr, min_lr=lr / 10, warmup_steps=30, eval_every=0, save_merged=True,
                         out_dir=str(out / "tuned"), overwrite=True, seed=seed, quiet=not progress)
    finetune(base, cfg)
    tuned = str(out / "tuned" / "merged")
    step("LoRA SFT", t)

    t = time.perf_counter()
    result = compare([base, tuned], tasks=f"qa={out / 'qa' / 'test.jsonl'}", chat=True, progress=progress)
    write_report(result, out / "report")
    step("evaluation", t)

    before, after = (m["metrics"]["qa"] for m in result["models"])
    summary = {"pairs": {"train": qa["train"], "test": qa["test"], "test_numeric": qa["test_numeric"]},
               "before": before, "after": after, "fixed": len(result["qa_changes"]["qa"]["fixed"]),
               "broken": len(result["qa_changes"]["qa"]["broken"]), "seconds": times,
               "wall_s": round(time.perf_counter() - t0, 1), "base": base, "tuned": tuned,
               "settings": {"base_steps": base_steps, "tune_steps": tune_steps, "pairs_per_page": pairs_per_page,
                            "lora_r": lora_r, "lr": lr, "seed": seed}}
    (out / "demo.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary
