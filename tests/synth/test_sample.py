"""`gptlab sample`: n completions per prompt, verified; passing ones as SFT rows, pass/fail pairs for DPO."""

import json
import sys

import pytest

from gptlab.cli import main
from gptlab.synth.sample import rejection_sample

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def verifier(tmp_path, monkeypatch):
    (tmp_path / "parity_check.py").write_text(
        "def even(prompts, completions, **kw):\n    return [None if not c else len(c) % 2 == 0 for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "parity_check:even"
    sys.modules.pop("parity_check", None)


def _prompts(tmp_path, chat=False):
    rows = [{"prompt": [{"role": "user", "content": f"Say {i}"}] if chat else f"Say {i}:", "answer": str(i)}
            for i in range(5)]
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_verified_completions_become_sft_rows_and_pairs(tmp_path, tiny_gpt2_dir, verifier):
    data = _prompts(tmp_path)
    r = rejection_sample(str(tiny_gpt2_dir), str(data), tmp_path / "s", n=4, verify=verifier, max_new_tokens=6,
                         seed=3, progress=False)
    sft, pairs = _jsonl(tmp_path / "s" / "sft.jsonl"), _jsonl(tmp_path / "s" / "pairs.jsonl")
    assert r["samples"] == 20 and r["sft_rows"] == r["passed"] == len(sft)
    assert all(len(x["completion"]) % 2 == 0 for x in sft)
    for p in pairs:
        assert len(p["chosen"]) % 2 == 0 and len(p["rejected"]) % 2 == 1
    both = [p for p in r["per_prompt"] if p["passed"] and p["failed"]]
    assert len(pairs) == len(both)
    assert all(p["passed"] + p["failed"] + p["no_verdict"] == 4 for p in r["per_prompt"])
    again = rejection_sample(str(tiny_gpt2_dir), str(data), tmp_path / "s2", n=4, verify=verifier, max_new_tokens=6,
                             seed=3, progress=False)
    assert _jsonl(tmp_path / "s2" / "sft.jsonl") == sft  # seeded: the same samples


def test_chat_prompts_keep_their_shape(tmp_path, tiny_gpt2_dir, verifier, capsys):
    data = _prompts(tmp_path, chat=True)
    assert main(["sample", str(tiny_gpt2_dir), "--data", str(data), "--n", "4", "--verify", verifier,
                 "--max-new-tokens", "6", "-o", str(tmp_path / "s"), "--no-progress"]) == 0
    assert "prompts x 4" in capsys.readouterr().out
    for row in _jsonl(tmp_path / "s" / "sft.jsonl"):
        assert row["messages"][0]["role"] == "user" and row["messages"][-1]["role"] == "assistant"
    for p in _jsonl(tmp_path / "s" / "pairs.jsonl"):
        assert p["chosen"][0]["role"] == "assistant" and isinstance(p["prompt"], list)


@pytest.mark.parametrize("rows,argv,says", [
    ([{"question": "x"}], [], "prompts.jsonl:1: no 'prompt' field"),
    ([{"prompt": "x"}], ["--verify", "numbers"], "a reward is numeric, exact, format or module:function"),
    ([{"prompt": "x"}], ["--verify", "numeric"], "needs an 'answer' field"),
    ([{"prompt": "x", "answer": "1"}], ["--temperature", "0"], "--temperature 0 samples the same completion"),
    ([{"prompt": "x", "answer": "1"}], ["--n", "0"], "n must be an integer >= 1, got 0"),
])
def test_bad_input_is_one_error(tmp_path, tiny_gpt2_dir, capsys, rows, argv, says):
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["sample", str(tiny_gpt2_dir), "--data", str(f), "--max-new-tokens", "2", "-o",
                 str(tmp_path / "s"), "--no-progress", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and says in err, err
