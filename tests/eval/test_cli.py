"""`gptlab eval` from the command line: results, JSON, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from gptlab.cli import main


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


MC = [{"context": "The with statement", "choices": ["wraps a block", "is a number", "x"], "label": 0},
      {"context": "A module is", "choices": ["a file", "a loop"], "label": "a file"},
      {"context": "", "choices": ["yes", "no"], "label": 1}]


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_eval_prints_a_table_and_writes_json(tiny_gpt2_dir, tmp_path, capsys):
    data = write(tmp_path / "mc.jsonl", MC)
    out = tmp_path / "results.json"
    assert main(["eval", str(tiny_gpt2_dir), "--task", "multiple_choice", "--data", str(data), "--out", str(out),
                 "--batch-size", "2", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "acc_norm" in table and "tokens/s" in table and "(n=3)" in table
    result = json.loads(out.read_text())
    assert result["n"] == 3 and set(result["metrics"]) == {"acc", "acc_norm"}
    assert result["config"]["batch_size"] == 2 and len(result["samples"]) == 3
    hits = [float(s["pred"] == s["label"]) for s in result["samples"]]
    mean = sum(hits) / 3
    assert result["metrics"]["acc"] == mean
    assert result["stderr"]["acc"] == pytest.approx((sum((h - mean) ** 2 for h in hits) / 2) ** 0.5 / 3 ** 0.5)


def test_perplexity_of_a_text_file(tiny_gpt2_dir, tmp_path, capsys, corpus_text):
    text = tmp_path / "corpus.txt"
    text.write_text(corpus_text[:2000])
    assert main(["eval", str(tiny_gpt2_dir), "--task", "perplexity", "--data", str(text), "--stride", "64",
                 "--no-progress"]) == 0
    assert "bits_per_byte" in capsys.readouterr().out


@pytest.mark.parametrize("rows,args,message", [
    ([MC[0], MC[1], "{not json"], [], r"mc.jsonl:3: not valid JSON"),
    ([MC[0], {"context": "x", "label": 0}], [], r"mc.jsonl:2: missing field 'choices'"),
    ([MC[0], {"context": "x", "choices": ["a", "b"], "label": 5}], [], r"mc.jsonl:2: label 5 is out of range"),
    ([MC[0], "[1, 2]"], [], r"mc.jsonl:2: expected a JSON object"),
    ([MC[0]], ["--stride", "4"], r"stride do not apply to task multiple_choice"),
])
def test_bad_input_is_one_line_and_exit_1(tiny_gpt2_dir, tmp_path, capsys, rows, args, message):
    data = write(tmp_path / "mc.jsonl", rows)
    assert main(["eval", str(tiny_gpt2_dir), "--task", "multiple_choice", "--data", str(data), "--no-progress",
                 *args]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ")
    assert re.search(message, err), err


def test_missing_task_and_missing_data(tiny_gpt2_dir, tmp_path, capsys):
    assert main(["eval", str(tiny_gpt2_dir)]) == 1
    assert "--task is required" in capsys.readouterr().err
    assert main(["eval", str(tiny_gpt2_dir), "--task", "qa"]) == 1
    assert "needs --data" in capsys.readouterr().err
    assert main(["eval", str(tiny_gpt2_dir), "--task", "lambada", "--data", str(tmp_path / "nope.jsonl")]) == 1
    assert "neither a file nor a standard benchmark" in capsys.readouterr().err


def test_standard_benchmark_offline_is_a_clear_one_line_error(tiny_gpt2_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cli = "import sys; from gptlab.cli import main; sys.exit(main(sys.argv[1:]))"
    p = subprocess.run([sys.executable, "-c", cli, "eval", str(tiny_gpt2_dir), "--task", "hellaswag", "--limit", "5",
                        "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 1
    lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "could not fetch 'hellaswag'" in lines[0] and "--data" in lines[0], p.stderr


def test_importing_the_eval_package_stays_light():
    code = ("import sys, gptlab.eval, gptlab.eval.tasks; "
            "print('gptlab.cli' in sys.modules, 'lm_eval' in sys.modules, 'datasets' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.stdout.split() == ["False", "False", "False"], p.stderr


def test_perplexity_at_growing_windows_in_one_run_with_a_chart(tiny_gpt2_dir, tmp_path, capsys, corpus_text):
    text = tmp_path / "corpus.txt"
    text.write_text(corpus_text[:3000])
    out = tmp_path / "ppl.json"
    assert main(["eval", str(tiny_gpt2_dir), "--task", "perplexity", "--data", str(text), "--window", "16,64,32",
                 "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bits_per_byte@16" in printed and "bits_per_byte@64" in printed
    saved = json.loads(out.read_text())
    rows = saved["details"]["windows"]
    assert [r["window"] for r in rows] == [16, 32, 64]
    assert (tmp_path / "ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # each window's numbers are those of a run at that window alone
    for r in rows:
        alone = tmp_path / f"w{r['window']}.json"
        assert main(["eval", str(tiny_gpt2_dir), "--task", "perplexity", "--data", str(text), "--window",
                     str(r["window"]), "--no-progress", "--out", str(alone)]) == 0
        single = json.loads(alone.read_text())["metrics"]
        assert single["bits_per_byte"] == pytest.approx(r["bits_per_byte"], rel=1e-9)
        assert single["token_perplexity"] == pytest.approx(saved["metrics"][f"token_perplexity@{r['window']}"])
    capsys.readouterr()


@pytest.mark.parametrize("window, message", [
    ("16,abc", "--window takes a token count or comma-separated counts"),
    ("16,16", "--window sizes must be distinct"),
    ("16,0", "window must be an integer >= 1, got 0"),
    ("16,100000", "window 100000 is past the model's context"),
])
def test_bad_window_lists_are_one_line(tiny_gpt2_dir, tmp_path, capsys, corpus_text, window, message):
    text = tmp_path / "corpus.txt"
    text.write_text(corpus_text[:500])
    assert main(["eval", str(tiny_gpt2_dir), "--task", "perplexity", "--data", str(text), "--window", window,
                 "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ") and message in err, err
