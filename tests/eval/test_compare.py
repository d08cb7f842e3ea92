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
