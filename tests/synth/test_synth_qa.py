"""`synth qa` against a stand-in teacher that replies like a chatty LLM, and against gptlab serve."""

import json
import re

import pytest

from gptlab.errors import GptlabError
from gptlab.synth.qa import synth_qa
from tests.synth.conftest import Teacher, pdf_bytes, stand_in

PAGES = {  # a section heading -> its text
    "Limits": "The daily transfer limit is 50,000 yuan. A single mobile transfer may not exceed 20,000 yuan.",
    "Fees": "Transfers to other banks cost 0.5% of the amount. A paper statement costs 8 yuan.",
    "Cards": "A new card arrives within 10 days.",
}
FENCED = """Sure! Here are {n} question-answer pairs based on the text:

```json
{{"pairs": [
  {{"question": "What is the daily transfer limit?", "answer": "50000 yuan"}},
  {{"question": "What is the daily transfer limit?", "answer": "50,000 yuan"}},
  {{"question": "What is the daily transfer limit ?", "answer": "50,000"}},
  {{"question": "How much can a single mobile transfer be at most?", "answer": "20,000 yuan"}},
  {{"question": "How much can a single mobile transfer be at most, exactly?", "answer": "20,000"}},
  {{"question": "What is the weekly transfer limit?", "answer": "300,000 yuan"}},
  {{"question": "Who sets the limits?", "answer": ""}},
]}}
```
I hope these help!"""
FEES = '[{"q": "What do transfers to other banks cost?", "a": "0.5% of the amount"}, {"q": "What does a paper statement cost?", "a": "8 yuan"}]'


def chatty(user: str, n: int):
    if "Source:" not in user:
        return 500
    if "(Limits)" in user:
        return FENCED.format(n=15)
    if "(Fees)" in user:
        return 429 if n == 1 else FEES  # rate-limited once, then answered
    return "I'm sorry, I can't produce JSON for this page."  # Cards: a malformed reply


@pytest.fixture
def docs(tmp_path):
    f = tmp_path / "rules.md"
    f.write_text("".join(f"# {h}\n{t}\n\n" for h, t in PAGES.items()))
    return f


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_chatty_teacher_pairs_kept_drops_counted_sources_recorded(tmp_path, docs):
    teacher = Teacher(chatty)
    with stand_in(teacher) as url:
        r = synth_qa([str(docs)], tmp_path / "qa", teacher=url, teacher_model="stand-in", concurrency=1,
                     test_fraction=0.0, progress=False)
    assert r["pairs_received"] == 9 and r["pairs_kept"] == 4
    assert r["dropped"] == {"empty_question": 0, "empty_answer": 1, "long_answer": 0, "number_not_in_page": 1,
                            "duplicate_question": 2, "near_duplicate_question": 1}
    s = r["teacher_stats"]
    assert (s["calls"], s["retries"], s["unreadable"], s["cached"], s["schema"]) == (3, 1, 1, 0, False)
    rows = _rows(tmp_path / "qa" / "train.jsonl")
    assert [(x["question"], x["answer"], x["where"]) for x in rows] == [
        ("What is the daily transfer limit?", "50000 yuan", "Limits"),  # 50000 = the page's 50,000
        ("How much can a single mobile transfer be at most?", "20,000 yuan", "Limits"),
        ("What do transfers to other banks cost?", "0.5% of the amount", "Fees"),
        ("What does a paper statement cost?", "8 yuan", "Fees")]
    assert all(x["source"] == str(docs) for x in rows)
    assert (tmp_path / "qa" / "test.jsonl").read_text() == ""
    md = (tmp_path / "qa" / "report.md").read_text()
    assert "| number_not_in_page | 1 |" in md and "retries 1" in md
    # the prompt asked for the numbers of the report's settings
    assert "Write 15 question-answer pairs" in teacher.requests[0]["messages"][1]["content"]


def test_rerun_reuses_the_cache_and_pays_nothing(tmp_path, docs):
    teacher = Teacher(chatty)
    with stand_in(teacher) as url:
        first = synth_qa([str(docs)], tmp_path / "qa", teacher=url, teacher_model="stand-in", progress=False)
        asked = len(teacher.requests)
        again = synth_qa([str(docs)], tmp_path / "qa", teacher=url, teacher_model="stand-in", dedup_threshold=0.5,
                         overwrite=True, progress=False)
    assert len(teacher.requests) == asked  # every page answered from the cache
    assert again["teacher_stats"]["calls"] == 0 and again["teacher_stats"]["cached"] == 3
    assert again["pairs_received"] == first["pairs_received"]


def test_a_failing_teacher_loses_nothing_and_the_rerun_asks_only_the_rest(tmp_path, docs):
    down = {"on": True}

    def flaky(user, n):
        return 503 if down["on"] and "(Cards)" in user else chatty(user, n)

    teacher = Teacher(flaky)
    with stand_in(teacher) as url:
        with pytest.raises(GptlabError, match=r"kept failing .* after 3 tries.*replies received so far are kept"):
            synth_qa([str(docs)], tmp_path / "qa", teacher=url, teacher_model="stand-in", max_retries=2,
                     concurrency=1, progress=False)
        cache = (tmp_path / "qa" / "cache" / "teacher.jsonl").read_text().splitlines()
        assert len(cache) == 2  # Limits and Fees were answered before Cards failed
        down["on"] = False
        before = len(teacher.requests)
        r = synth_qa([str(docs)], tmp_path / "qa", teacher=url, teacher_model="stand-in", overwrite=True,
                     progress=False)
    assert len(teacher.requests) - before == 1 and r["teacher_stats"]["cached"] == 2
    assert r["pairs_kept"] == 4


def test_a_schema_server_still_loading_gets_the_schema_after_a_retry(tmp_path, docs):
    teacher = Teacher(chatty, owned_by="vllm", models_busy=2)
    with stand_in(teacher) as url:
        r = synth_qa([str(docs)], tmp_path / "qa", teacher=url, teacher_model="m", concurrency=1, progress=False)
    assert r["teacher_stats"]["schema"] and r["teacher_stats"]["retries"] == 3  # 2 on /models, 1 on the 429
    fmt = teacher.requests[0]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"]["properties"]["pairs"]["maxItems"] == 15


def test_wrong_api_key_and_refused_connection(tmp_path, docs):
    with stand_in(Teacher(chatty, key="right")) as url:
        with pytest.raises(GptlabError, match="refused the API key.*401.*--api-key"):
            synth_qa([str(docs)], tmp_path / "a", teacher=url, teacher_model="m", api_key="wrong", progress=False)
        r = synth_qa([str(docs)], tmp_path / "b", teacher=url, teacher_model="m", api_key="right", progress=False)
        assert r["pairs_kept"] == 4
    with pytest.raises(GptlabError, match=f"cannot reach the teacher at {re.escape(url)}"):
        synth_qa([str(docs)], tmp_path / "c", teacher=url, teacher_model="m", max_retries=1, progress=False)


def test_bad_documents_fail_before_any_teacher_call(tmp_path, docs):
    teacher = Teacher(chatty)
    bad = tmp_path / "scan.pdf"
    bad.write_bytes(b"%PDF-1.4 garbage")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with stand_in(teacher) as url:
        for f, message in ((bad, "not a readable PDF"), (empty, "empty document")):
            with pytest.raises(GptlabError, match=message):
                synth_qa([str(docs), str(f)], tmp_path / "qa", teacher=url, teacher_model="m", overwrite=True,
                         progress=False)
    assert teacher.requests == []
    with pytest.raises(GptlabError, match="--teacher-model is required"):
        synth_qa([str(docs)], tmp_path / "qa", teacher="http://127.0.0.1:9/v1", progress=False)
    with pytest.raises(GptlabError, match="http"):
        synth_qa([str(docs)], tmp_path / "qa", teacher="gpt-4o", teacher_model="m", progress=False)


def test_extractive_split_by_page_and_pdf_sources(tmp_path):
    f = tmp_path / "book.pdf"
    f.write_bytes(pdf_bytes(["The fee is 8 yuan. The limit is 40 transfers per day.",
                             "A card arrives within 10 days. A lost card costs 15 yuan.",
                             "Complaints are answered within 2 business days."]))
    r = synth_qa([str(f)], tmp_path / "qa", split_by="page", test_fraction=0.34, progress=False)
    train, test = _rows(tmp_path / "qa" / "train.jsonl"), _rows(tmp_path / "qa" / "test.jsonl")
    assert r["pages"] == 3 and r["numeric_share"]["achieved"] == 1.0
    assert {x["where"] for x in train}.isdisjoint({x["where"] for x in test}) and test
    assert {x["where"] for x in train + test} == {"page 1", "page 2", "page 3"}


def test_gptlab_serve_as_the_teacher_with_a_json_schema(tmp_path, docs, tiny_tokenizer):
    """A random tiny model behind gptlab serve: the schema in response_format makes every reply parse."""
    from gptlab.serve.app import ServeConfig, create_app
    from tests.conftest import make_hf_model, save_hf_model
    from tests.serve.conftest import QWEN3_TEMPLATE, running

    from gptlab.tokenizer import load_tokenizer

    tiny_tokenizer.save(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")  # a copy: the session's tokenizer stays template-free
    tok.chat_template = QWEN3_TEMPLATE
    path = save_hf_model(make_hf_model("gpt2", vocab_size=tok.vocab_size, n_positions=2048, bos_token_id=0,
                                       eos_token_id=0), tmp_path / "m", tok)
    app = create_app(ServeConfig(model=str(path), served_model_name="m"))
    with running(app) as base:
        # greedy, so the same replies every run: random strings, which the schema cuts one character past
        # --max-answer-chars, so every pair is dropped as long_answer
        with pytest.raises(GptlabError, match=r"no pairs survived the filters \(dropped: \{'long_answer': 3\}\)"):
            synth_qa([str(docs)], tmp_path / "qa", teacher=base + "/v1", teacher_model="m", pairs_per_page=1,
                     max_answer_chars=20, temperature=0.0, progress=False)
    cache = [json.loads(line) for line in (tmp_path / "qa" / "cache" / "teacher.jsonl").read_text().splitlines()]
    assert len(cache) == 3
    for entry in cache:  # every reply is exactly the schema: one pair, parsed without any repair
        data = json.loads(entry["reply"], strict=False)
        assert list(data) == ["pairs"] and len(data["pairs"]) == 1
        pair = data["pairs"][0]
        assert list(pair) == ["question", "answer"] and len(pair["answer"]) == 21 and len(pair["question"]) <= 500
        assert entry["usage"]["completion_tokens"] > 0
