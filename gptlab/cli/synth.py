"""Commands that make training data: `gptlab synth qa` (documents -> teacher -> QA pairs, gptlab.synth.qa),
`gptlab synth demo` (the rule-book workflow end to end) and `gptlab sample` (rejection sampling)."""

from __future__ import annotations

from gptlab.cli import command


@command("synth qa")
def synth_qa_command(docs: list[str], teacher: str = "extractive", teacher_model: str | None = None,
                     api_key: str | None = None, pairs_per_page: int = 15, numeric_share: float = 0.3,
                     language: str = "auto", chunk_chars: int = 3000, concurrency: int = 4, max_retries: int = 5,
                     response_format: str = "auto", temperature: float = 0.3, max_answer_chars: int = 300,
                     dedup_threshold: float = 0.8,
                     test_fraction: float = 0.2, split_by: str = "pair", seed: int = 0, out: str = "qa",
                     overwrite: bool = False, progress: bool = True) -> int:
    """Write question-answer pairs about documents with a teacher, filter them, split train / test.

    Writes OUT/train.jsonl and test.jsonl (read by `finetune --task sft` and `eval --task qa`),
    report.json and report.md; the teacher's replies are cached in OUT/cache. docs/domain-qa.md:

      gptlab synth qa rules/ --teacher http://localhost:8000/v1 --teacher-model qwen --out qa
      gptlab synth qa handbook.pdf --teacher extractive --out qa

    Args:
        docs: .txt, .md (split at headings), .pdf (a page each), .jsonl (`text`) files or folders
        teacher: an OpenAI-compatible API URL, or `extractive` (no LLM: questions from sentences with numbers)
        teacher_model: the model name the teacher's endpoint serves
        api_key: the teacher's API key (default: $OPENAI_API_KEY)
        pairs_per_page: pairs to ask for per page
        numeric_share: least share of numeric questions to ask for
        language: auto (each page's own), en or zh
        chunk_chars: cut longer sections into chunks of at most this many characters
        concurrency: teacher requests at once
        max_retries: retries of a request on 429, 5xx, timeouts and refused connections
        response_format: auto (a JSON schema where the server enforces it: gptlab, vLLM), schema or none
        temperature: the teacher's sampling temperature
        max_answer_chars: drop longer answers
        dedup_threshold: drop questions at least this similar to a kept one (MinHash)
        test_fraction: share held out for test.jsonl
        split_by: pair or page
        seed: seed of the split
        out: output dir (-o)
        overwrite: write into OUT even when it holds files gptlab did not write
        progress: show a progress bar
    """
    from gptlab.synth.qa import synth_qa

    r = synth_qa(docs, out, teacher=teacher, teacher_model=teacher_model, api_key=api_key,
                 pairs_per_page=pairs_per_page, numeric_share=numeric_share, language=language,
                 chunk_chars=chunk_chars, concurrency=concurrency, max_retries=max_retries,
                 response_format=response_format, temperature=temperature, max_answer_chars=max_answer_chars,
                 dedup_threshold=dedup_threshold, test_fraction=test_fraction, split_by=split_by, seed=seed,
                 overwrite=overwrite, progress=progress)
    dropped = ", ".join(f"{k} {v}" for k, v in r["dropped"].items() if v) or "none"
    print(f"{r['pages']} pages -> {r['pairs_received']} pairs received, {r['pairs_kept']} kept "
          f"({r['numeric_share']['achieved']:.0%} numeric); dropped: {dropped}")
    print(f"wrote {out}/train.jsonl ({r['train']} pairs), test.jsonl ({r['test']}), report.json, report.md")
    return 0


@command("synth demo")
def synth_demo_command(out: str = "domain-demo", base: str | None = None, base_steps: int = 600,
                       tune_steps: int = 1200, pairs_per_page: int = 40, lora_r: int = 64, lr: float = 5e-3,
                       seed: int = 0,
                       overwrite: bool = False, progress: bool = True) -> int:
    """The domain-QA workflow end to end on the built-in rule book (~10 min on 2 CPU cores).

    Rule book -> `synth qa --teacher extractive` -> a small base model (pretrained here unless --base) ->
    LoRA SFT -> strict evaluation before and after -> OUT/report (report.md, report.html, qa.png) and
    OUT/demo.json. docs/domain-qa.md walks through each step.

    Args:
        out: output dir (-o)
        base: start from this model dir instead of pretraining one
        base_steps: pretraining steps of the base model
        tune_steps: LoRA SFT steps
        pairs_per_page: question-answer pairs per rule-book page (several wordings of each fact)
        lora_r: adapter rank (alpha = rank)
        lr: LoRA learning rate
        seed: seed of the split, the base model and the adapters
        overwrite: write into OUT even when it holds files gptlab did not write
        progress: show progress
    """
    from gptlab.synth.demo import run_demo

    s = run_demo(out, base=base, base_steps=base_steps, tune_steps=tune_steps, pairs_per_page=pairs_per_page,
                 lora_r=lora_r, lr=lr, seed=seed, overwrite=overwrite, progress=progress)
    b, a = s["before"], s["after"]
    print(f"{s['pairs']['test']} test questions ({s['pairs']['test_numeric']} numeric), strict evaluation:")
    for name, m in (("before", b), ("after", a)):
        print(f"  {name:6}  exact {m['exact']:.1%}  F1 {m['f1']:.1%}  contains {m['contains']:.1%}  "
              f"strict {m['strict']:.1%}  numeric {m['numeric_acc']:.1%}")
    print(f"{s['fixed']} fixed, {s['broken']} broken; {s['wall_s'] / 60:.1f} min; report: {out}/report/report.md")
    return 0


@command("sample")
def sample_command(model: str, data: str | None = None, n: int = 8, verify: str = "numeric", max_new_tokens: int = 128,
                   temperature: float = 0.8, top_p: float | None = None, seed: int = 0, batch_size: int = 16,
                   dtype: str | None = None, out: str = "samples", overwrite: bool = False,
                   progress: bool = True) -> int:
    """Rejection sampling: n completions per prompt, verified, kept as SFT rows and DPO pairs.

    Writes OUT/sft.jsonl (passing completions, for `finetune --task sft`), OUT/pairs.jsonl (a passing
    and a failing completion per prompt, for `--task dpo`) and OUT/report.json (counts per prompt):

      gptlab sample out/model --data math.jsonl --n 8 --verify numeric -o samples

    Args:
        model: a model dir or hub id
        data: JSONL rows with `prompt` (text or chat messages) and the fields the verifier reads (`answer`)
        n: completions per prompt
        verify: numeric, exact (against the row's `answer`), format, or module:function
        max_new_tokens: tokens per completion
        temperature: sampling temperature
        top_p: nucleus sampling
        seed: sampling seed
        batch_size: prompts generated together (each with its n samples)
        dtype: float32, bfloat16, float16 (default: the checkpoint's)
        out: output dir (-o)
        overwrite: write into OUT even when it holds files gptlab did not write
        progress: show a progress bar
    """
    from gptlab.errors import GptlabError
    from gptlab.synth.sample import rejection_sample

    if not data:
        raise GptlabError("pass the prompts with --data FILE.jsonl")
    r = rejection_sample(model, data, out, n=n, verify=verify, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_p=top_p, seed=seed, batch_size=batch_size, dtype=dtype, overwrite=overwrite,
                         progress=progress)
    print(f"{r['prompts']} prompts x {n}: {r['passed']} of {r['samples']} passed ({r['pass_rate']:.1%}), "
          f"{r['prompts_with_a_pass']} prompts with a pass")
    print(f"wrote {out}/sft.jsonl ({r['sft_rows']} rows), pairs.jsonl ({r['pairs']} pairs), report.json")
    return 0
