"""`gptlab synth demo` end to end, shortened: rule book -> extractive QA -> LoRA SFT -> before/after report.
(The full-length demo's figures are in docs/domain-qa.md; this checks the pipeline and its files.)"""

import json

import pytest

from gptlab.cli import main
from gptlab.data.examples import to_messages

pytestmark = pytest.mark.usefixtures("one_thread")


def test_qa_rows_train_as_one_turn():
    assert to_messages({"question": "Fee?", "answer": "8 yuan", "source": "a.md"}, "x:1") == [
        {"role": "user", "content": "Fee?"}, {"role": "assistant", "content": "8 yuan"}]
    assert to_messages({"question": "Fee?", "answer": ["8 yuan", "8"]}, "x:1")[1]["content"] == "8 yuan"
    with pytest.raises(ValueError, match="x:1: field 'answer'"):
        to_messages({"question": "Fee?"}, "x:1")


def test_demo_runs_end_to_end(tmp_path, tiny_gpt2_dir, capsys):
    out = tmp_path / "demo"
    assert main(["synth", "demo", "--base", str(tiny_gpt2_dir), "--tune-steps", "3", "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "strict evaluation:" in printed and "numeric" in printed
    summary = json.loads((out / "demo.json").read_text())
    assert summary["pairs"]["test"] > 20 and summary["pairs"]["test_numeric"] == summary["pairs"]["test"]
    for side in ("before", "after"):
        assert set(summary[side]) >= {"exact", "f1", "contains", "strict", "numeric_acc"}
    qa = json.loads((out / "qa" / "report.json").read_text())
    assert qa["languages"] == {"en": 8, "zh": 6} and qa["pairs_per_page"]["min"] >= 8
    assert {json.loads(line)["language"] for line in (out / "qa" / "test.jsonl").read_text().splitlines()} == {"en", "zh"}
    report = (out / "report" / "report.md").read_text()
    assert "qa: numeric_acc" in report and "## qa:" in report and (out / "report" / "qa.png").is_file()
    assert (out / "tuned" / "merged" / "model.safetensors").is_file()
