"""gptlab's evaluator against lm-evaluation-harness on the same checkpoint and data.

The harness runs its own `hf` model (transformers) on local task YAMLs this module writes (`dataset_path:
json` + data_files); gptlab's `evaluate` reads the same JSONL. LAMBADA acc + perplexity, multiple-choice
acc + acc_norm (zero- and 2-shot) and rolling word / byte perplexity + bits per byte must agree to 1e-4
relative, and the adapter ("gptlab" as a harness model) must give the `hf` model's numbers and generations.
The data covers the harness's edge cases: an empty context (scored after the BOS), a context ending in
spaces (moved to the continuation), contexts longer than the model's 128 positions (truncated on the left),
one-token and multi-token choices, and LAMBADA targets the model does predict (so acc is not trivially 0).
"""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch

import gptlab
from gptlab.eval import evaluate
from tests.conftest import pydoc_text

lm_eval = pytest.importorskip("lm_eval")

REL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def _sentences() -> list[str]:
    flat = re.sub(r"\s+", " ", pydoc_text())
    return [s.strip() for s in re.split(r"(?<=[.!?]) ", flat) if 8 <= len(s.split()) <= 40]


def _predicted_word_passages(model_dir, sentences: list[str], n: int) -> list[str]:
    """Passages whose last word is the model's own greedy next token, so LAMBADA acc has hits to agree on."""
    from gptlab.eval.scorer import Scorer

    model, tok = gptlab.load(model_dir), gptlab.load_tokenizer(model_dir)
    scorer = Scorer(model, tok, progress=False)
    out = []
    for s in sentences:
        context = " ".join(s.split(" ")[:6])
        ids = scorer.encode(context)
        with torch.no_grad():
            word = tok.decode([int(model(torch.tensor([ids]))[0, -1].argmax())])
        if re.fullmatch(r" [A-Za-z]{2,}", word) and scorer.encode(context + word) == ids + tok.encode(word):
            out.append(context + word)
        if len(out) == n:
            break
    return out


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory, tiny_gpt2_dir):
    d = tmp_path_factory.mktemp("eval-data")
    sents = _sentences()
    rng = random.Random(0)
    lambada = [{"text": s.rstrip(".")} for s in sents[:24]]
    lambada += [{"text": t} for t in _predicted_word_passages(tiny_gpt2_dir, sents[300:], 6)]
    mc = []
    for i in range(20):
        words = sents[100 + i].split(" ")
        k = len(words) // 2
        others = [" ".join(sents[200 + rng.randrange(300)].split(" ")[: rng.randrange(1, 9)]) for _ in range(3)]
        label = rng.randrange(4)
        choices = others[:label] + [" ".join(words[k:])] + others[label:]
        mc.append({"context": " ".join(words[:k]), "choices": choices, "label": label})
    mc[0]["context"] = ""  # scored after the prefix token
    mc[1]["context"] += "  "  # trailing spaces move to the continuation
    mc[2]["context"] = " ".join(sents[400:412])  # longer than the 128-token context: truncated on the left
    mc[3]["choices"] = ["a", "the", "is", "of"]  # one-token choices
    text = pydoc_text()
    docs = [{"text": text[i * 2500: (i + 1) * 2500]} for i in range(3)] + [{"text": "Short document."}]
    prompts = [{"context": " ".join(sents[500 + i].split(" ")[:8])} for i in range(6)]
    for name, rows in (("lambada", lambada), ("mc", mc), ("docs", docs), ("prompts", prompts)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {path}\n"

    def head(task: str, output_type: str, data: str) -> str:
        return f"task: {task}\noutput_type: {output_type}\n" + common.format(path=d / data)

    (d / "t_lambada.yaml").write_text(head("t_lambada", "loglikelihood", "lambada.jsonl") + """\
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' '+text.split(' ')[-1]}}"
metric_list:
  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}
  - {metric: acc, aggregation: mean, higher_is_better: true}
""")
    (d / "t_mc.yaml").write_text(head("t_mc", "multiple_choice", "mc.jsonl") + """\
doc_to_text: "{{context}}"
doc_to_target: "{{label}}"
doc_to_choice: "{{choices}}"
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
""")
    (d / "t_roll.yaml").write_text(head("t_roll", "loglikelihood_rolling", "docs.jsonl") + """\
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
""")
    # 2-shot: examples drawn from the same data by the harness's sampler (seed 1234, the question left out)
    (d / "t_mc2shot.yaml").write_text((d / "t_mc.yaml").read_text().replace("task: t_mc", "task: t_mc2shot")
                                      + "fewshot_split: test\nnum_fewshot: 2\n")
    (d / "t_gen.yaml").write_text(head("t_gen", "generate_until", "prompts.jsonl") + """\
doc_to_text: "{{context}}"
doc_to_target: "{{context}}"
generation_kwargs: {until: [".", ";"], max_gen_toks: 12, do_sample: false}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
""")
    return d


def _harness(model: str, model_dir, data_dir) -> dict[str, dict[str, float]]:
    from lm_eval.tasks import TaskManager

    import gptlab.eval.lm_eval_adapter  # noqa: F401  (registers "gptlab")

    tm = TaskManager(include_path=str(data_dir), include_defaults=False)
    out = lm_eval.simple_evaluate(model=model, model_args=f"pretrained={model_dir},dtype=float32",
                                  tasks=["t_lambada", "t_mc", "t_mc2shot", "t_roll", "t_gen"], task_manager=tm,
                                  batch_size=4, device="cpu", bootstrap_iters=0, log_samples=True)
    metrics = {task: {k.split(",")[0]: v for k, v in r.items() if "," in k and "stderr" not in k}
               for task, r in out["results"].items()}
    samples = {task: sorted(rows, key=lambda s: s["doc_id"]) for task, rows in out["samples"].items()}
    metrics["generations"] = [s["resps"][0][0] for s in samples["t_gen"]]
    metrics["2shot_loglikelihoods"] = [[r[0][0] for r in s["resps"]] for s in samples["t_mc2shot"]]
    return metrics


@pytest.fixture(scope="module")
def harness_hf(tiny_gpt2_dir, eval_data):
    return _harness("hf", tiny_gpt2_dir, eval_data)


@pytest.fixture(scope="module")
def ours(tiny_gpt2_dir, eval_data):
    """gptlab's numbers at batch sizes 1, 3 and 64 (a batch that holds everything)."""
    runs = {"lambada": ("lambada", "lambada.jsonl"), "mc": ("multiple_choice", "mc.jsonl"),
            "roll": ("perplexity", "docs.jsonl")}
    return {bs: {name: evaluate(tiny_gpt2_dir, task, eval_data / data, batch_size=bs, progress=False)
                 for name, (task, data) in runs.items()}
            for bs in (1, 3, 64)}


def test_harness_reads_the_tokenizer_gptlab_saved(tiny_gpt2_dir, tiny_tokenizer):
    """AutoTokenizer opens the dir and adds no BOS: the harness and gptlab encode the same ids."""
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(tiny_gpt2_dir))
    text = "The with statement is used to wrap the execution of a block."
    assert hf_tok.encode(text) == tiny_tokenizer.encode(text, add_special_tokens=True)
    assert hf_tok.bos_token_id == tiny_tokenizer.bos_id == 0


def test_lambada_matches_harness(harness_hf, ours):
    h, g = harness_hf["t_lambada"], ours[3]["lambada"].metrics
    assert 0 < h["acc"] < 1  # the crafted passages give real hits and misses
    assert g["acc"] == h["acc"]
    assert g["perplexity"] == pytest.approx(h["perplexity"], rel=REL)


def test_multiple_choice_matches_harness(harness_hf, ours):
    h, g = harness_hf["t_mc"], ours[3]["mc"].metrics
    assert g["acc"] == h["acc"] and g["acc_norm"] == h["acc_norm"]
    assert g["acc"] != g["acc_norm"]  # length normalisation changed some answers, so both are exercised


def test_k_shot_multiple_choice_draws_the_harness_examples(harness_hf, tiny_gpt2_dir, eval_data):
    g = evaluate(tiny_gpt2_dir, "multiple_choice", eval_data / "mc.jsonl", num_fewshot=2, seed=1234, progress=False)
    assert g.metrics["acc"] == harness_hf["t_mc2shot"]["acc"]
    assert g.metrics["acc_norm"] == harness_hf["t_mc2shot"]["acc_norm"]
    for ours, theirs in zip(g.samples, harness_hf["2shot_loglikelihoods"], strict=True):
        assert ours["loglikelihoods"] == pytest.approx(theirs, rel=REL)


def test_rolling_perplexity_matches_harness(harness_hf, ours):
    h, g = harness_hf["t_roll"], ours[3]["roll"].metrics
    for k in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert g[k] == pytest.approx(h[k], rel=REL), k
    assert ours[3]["roll"].config["windows"] > 4  # documents longer than the context span several windows


def test_batch_size_does_not_change_any_number(ours):
    base = ours[1]
    for bs in (3, 64):
        for task in ("lambada", "mc", "roll"):
            a, b = base[task], ours[bs][task]
            for k, v in a.metrics.items():
                assert b.metrics[k] == pytest.approx(v, rel=1e-6), (bs, task, k)
            for sa, sb in zip(a.samples, b.samples):
                for key in ("loglikelihood", "loglikelihoods"):
                    if key in sa:
                        assert sb[key] == pytest.approx(sa[key], rel=1e-6)
                assert sa.get("correct") == sb.get("correct") and sa.get("pred") == sb.get("pred")


def test_gptlab_as_a_harness_model_matches_hf(tiny_gpt2_dir, eval_data, harness_hf):
    """The adapter: any harness task runs on a gptlab model and gives the `hf` model's numbers."""
    g = _harness("gptlab", tiny_gpt2_dir, eval_data)
    # generate_until: greedy continuations cut at the task's stop strings, identical text
    assert g["generations"] == harness_hf["generations"]
    assert any(harness_hf["generations"])
    assert g["2shot_loglikelihoods"] == [pytest.approx(x, rel=REL) for x in harness_hf["2shot_loglikelihoods"]]
    for task, metrics in harness_hf.items():
        if task in ("generations", "2shot_loglikelihoods"):
            continue
        for k, v in metrics.items():
            assert g[task][k] == pytest.approx(v, rel=REL), (task, k)
            assert math.isfinite(g[task][k])
