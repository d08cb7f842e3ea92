"""QA scoring (lenient and strict) and the generate-then-score pipeline."""

from __future__ import annotations

import json

import pytest

import gptlab
from gptlab.data.examples import INSTRUCTION_TEMPLATE
from gptlab.eval import evaluate
from gptlab.eval.qa import score_answer, strip_think, tokens


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def test_lenient_normalisation_ignores_case_punctuation_and_articles():
    s = score_answer("The Eiffel Tower!", ["eiffel tower"])
    assert s["exact"] == s["contains"] == s["f1"] == 1.0
    s = score_answer("It is in Paris, France.", ["Paris"])
    assert s["exact"] == 0.0 and s["contains"] == 1.0 and 0 < s["f1"] < 1
    assert score_answer("Parisian food", ["Paris"])["contains"] == 0.0  # whole words, not substrings


def test_f1_is_token_overlap():
    s = score_answer("red green blue", ["green blue yellow"])
    assert s["f1"] == pytest.approx(2 / 3)  # precision 2/3, recall 2/3


def test_cjk_characters_are_tokens():
    assert tokens("答案是北京。") == ["答", "案", "是", "北", "京"]
    s = score_answer("答案是北京。", ["北京"])
    assert s["contains"] == 1.0 and s["f1"] == pytest.approx(2 * (2 / 5) * 1 / (2 / 5 + 1))


def test_strict_requires_every_reference_number_lenient_does_not():
    s = score_answer("about 1000 people", ["1,000 people"])
    assert s["strict"] == 1.0 and s["contains"] == 0.0 and s["has_number"]
    s = score_answer("5", ["5%"])  # lenient normalisation drops "%"; strict reads 5% as 0.05
    assert s["exact"] == 1.0 and s["strict"] == 0.0
    s = score_answer("三千五百元", ["3500元"])
    assert s["strict"] == 1.0
    s = score_answer("between 3 and 8", ["between 3 and 7"])
    assert s["strict"] == 0.0 and s["f1"] > 0.5


def test_without_numbers_strict_is_contains_and_the_best_reference_counts():
    s = score_answer("It was Ada Lovelace.", ["Charles Babbage", "Ada Lovelace"])
    assert s["strict"] == s["contains"] == 1.0 and not s["has_number"]


@pytest.mark.parametrize("raw,answer", [
    ("<think>maybe 12? no</think> The answer is 42.", "The answer is 42."),
    ("reasoning that the prompt opened</think>\n42", "42"),  # the chat template opened <think>
    ("42 <think>unfinished", "42"),  # an unclosed block: the rest never became an answer
    ("<think>a</think>x<think>b</think>y", "xy"),
    ("plain 42", "plain 42"),
])
def test_strip_think(raw, answer):
    assert strip_think(raw) == answer


def test_qa_pipeline_scores_the_models_own_answers(tiny_gpt2_dir, tmp_path):
    """References equal to the model's greedy answers score 1, others 0; numeric accuracy counts only
    questions whose reference holds a number; batching does not change what is generated."""
    from gptlab.infer.generate import generate

    model, tok = gptlab.load(tiny_gpt2_dir), gptlab.load_tokenizer(tiny_gpt2_dir)
    candidates = ["What does the with statement do?", "Name a built-in type.", "What is a module?",
                  "Which keyword defines a function?", "What is a class?", "What does import do?",
                  "What is a frame?", "What is an iterator?", "What is a keyword argument?"]
    outs = {q: generate(model, tok, f"Question: {q}\nAnswer:", max_new_tokens=6, stop=["\n"]) for q in candidates}
    answered = [q for q in candidates if tokens(outs[q])][:3]  # random weights: keep answers with words in them
    assert len(answered) == 3, outs
    rows = [{"question": answered[0], "answer": outs[answered[0]]},
            {"question": answered[1], "answers": ["zzz", outs[answered[1]].strip()]},
            {"question": "How many bytes in 1 KiB?", "answer": "1024 bytes"},  # the model will not say 1024
            {"question": answered[2], "answer": "a file of Python definitions"}]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = [evaluate(model, "qa", data, tokenizer=tok, batch_size=bs, max_new_tokens=6, progress=False)
               for bs in (1, 3)]
    assert [s["output"] for s in results[0].samples] == [s["output"] for s in results[1].samples]
    r = results[0]
    assert [s["output"] for s in r.samples][:2] == [outs[answered[0]], outs[answered[1]]]
    assert [s["exact"] for s in r.samples] == [1.0, 1.0, 0.0, 0.0]
    assert r.metrics["exact"] == pytest.approx(2 / 4)
    assert r.details["numeric_questions"] == 1 and r.metrics["numeric_acc"] == 0.0
    assert r.tokens > 0 and r.seconds > 0


def test_chat_prompts_and_fewshot_turns(tiny_gpt2_dir, tmp_path, monkeypatch):
    model, tok = gptlab.load(tiny_gpt2_dir), gptlab.load_tokenizer(tiny_gpt2_dir)
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(3)))
    # no template: the instruction template SFT trains with, so a base model is asked as its fine-tune is
    r = evaluate(model, "qa", data, tokenizer=tok, chat=True, max_new_tokens=2, progress=False)
    assert r.samples and tok.chat_template == INSTRUCTION_TEMPLATE
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    seen = []
    from gptlab.infer import generate as generate_module  # `gptlab.generate` is the function it defines

    monkeypatch.setattr(generate_module, "generate",
                        lambda m, t, prompts, **kw: (seen.extend(prompts), [""] * len(prompts))[1])
    evaluate(model, "qa", data, tokenizer=tok, chat=True, num_fewshot=1, seed=0, max_new_tokens=2, progress=False)
    assert len(seen) == 3
    for prompt in seen:  # one earlier exchange, then the question itself
        assert prompt.count("[user]") == 2 and prompt.count("[assistant]") == 2 and prompt.endswith("[assistant]")
