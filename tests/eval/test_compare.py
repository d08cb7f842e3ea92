"""gptlab compare: presets without weights show their published counts; models with weights get exactly the
numbers gptlab eval gives on the same data; the report's files are written and readable."""

from __future__ import annotations

import json
import shutil

import pytest

from gptlab.cli import main
from gptlab.eval import evaluate
from gptlab.eval.compare import compare, write_report
from gptlab.models.config import Config
from gptlab.models.stats import count_params

pytestmark = pytest.mark.usefixtures("one_thread")


def test_presets_compare_without_weights(tmp_path):
    result = compare(["gpt2", "qwen3-30b-a3b"])
    gpt2, moe = result["models"]
    assert gpt2["architecture"]["params"] == 124_439_808  # the published checkpoint's count
    assert moe["architecture"]["active"] == count_params(Config.from_name("qwen3-30b-a3b"))["active"]
    assert moe["architecture"]["mlp"] == "moe 8/128" and gpt2["metrics"] == {} and not gpt2["weights"]
    paths = write_report(result, tmp_path)
    assert "| parameters | 124.4M | 30.5B |" in paths["md"].read_text()
    assert "<table>" in paths["html"].read_text()
    for png in ("params.png", "flops.png", "memory.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_metrics_equal_gptlab_eval(tmp_path, tiny_gpt2_dir, corpus_text, capsys):
    other = tmp_path / "other"
    shutil.copytree(tiny_gpt2_dir, other)
    text = tmp_path / "val.txt"
    text.write_text(corpus_text[:3000])
    out = tmp_path / "cmp"
    assert main(["compare", str(tiny_gpt2_dir), "gpt2", "--data", str(text), "--tasks", "perplexity", "--bench",
                 "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity: bits_per_byte" in printed and "decode tok/s" in printed
    saved = json.loads((out / "comparison.json").read_text())
    ours = saved["models"][0]
    direct = evaluate(str(tiny_gpt2_dir), "perplexity", str(text), progress=False).metrics
    assert ours["metrics"]["perplexity"] == direct  # exactly gptlab eval's numbers
    assert ours["decode_tok_s"] > 0 and saved["models"][1]["metrics"] == {}  # the preset has no weights
    assert (out / "perplexity.png").is_file() and (out / "decode.png").is_file()


@pytest.mark.parametrize("argv, says", [(["nothere"], "neither a preset"), (["gpt2", "gpt2"], "each model once")])
def test_bad_model_lists_are_one_error(tmp_path, capsys, argv, says):
    assert main(["compare", *argv, "--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and says in err, err


def test_qa_before_after_lists_fixed_and_broken_questions(tmp_path, tiny_gpt2_dir):
    """Two models on QA with the chat prompt: metrics equal `eval --task qa --chat`; the report lists what changed."""
    from gptlab.eval.compare import qa_changes

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(6)))
    other = tmp_path / "other"
    shutil.copytree(tiny_gpt2_dir, other)
    result = compare([str(tiny_gpt2_dir), str(other)], tasks=f"qa={data}", chat=True, progress=False)
    direct = evaluate(str(other), "qa", str(data), chat=True, progress=False).metrics
    assert result["models"][1]["metrics"]["qa"] == direct
    assert result["qa_changes"]["qa"] == {"fixed": [], "broken": []}  # the same weights answer the same
    paths = write_report(result, tmp_path / "cmp")
    assert "## qa: 0 fixed, 0 broken" in paths["md"].read_text()
    assert (tmp_path / "cmp" / "qa.png").read_bytes()[:4] == b"\x89PNG"

    def sample(q, strict, answer):
        return {"question": q, "references": ["8 yuan"], "answer": answer, "strict": float(strict)}

    before = [sample("fee?", 0, "5 yuan"), sample("limit?", 1, "8"), sample("same?", 1, "8 yuan")]
    after = [sample("fee?", 1, "8 yuan"), sample("limit?", 0, "nine"), sample("same?", 1, "8")]
    changes = qa_changes([before, before, after])  # first model against the last
    assert [c["question"] for c in changes["fixed"]] == ["fee?"] and changes["fixed"][0]["before"] == "5 yuan"
    assert [c["question"] for c in changes["broken"]] == ["limit?"] and changes["broken"][0]["after"] == "nine"
    result["qa_changes"]["qa"] = changes
    md = write_report(result, tmp_path / "cmp2")["md"].read_text()
    assert "## qa: 1 fixed, 1 broken" in md and "| fee? | 8 yuan | 5 yuan | 8 yuan |" in md
