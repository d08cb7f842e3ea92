"""Verifiable rewards: the built-in verifiers, user functions by module:function, and their errors."""

import sys

import pytest

from gptlab.errors import GptlabError
from gptlab.eval.rewards import load_reward, score


def _score(spec, completions, rows):
    name, fn = load_reward(spec)
    return score(name, fn, [r.get("prompt", "") for r in rows], completions, rows)


def test_numeric_is_the_strict_qa_matcher():
    rows = [{"answer": "50,000 yuan"}] * 4 + [{"answer": 7}]
    got = _score("numeric", ["It is 50000 yuan.", "5万 yuan", "<think>maybe 50,000</think> 40,000", "none", "7"], rows)
    assert got == [1.0, 1.0, 0.0, 0.0, 1.0]  # 5万 = 50,000; reasoning does not count


def test_exact_and_format():
    assert _score("exact", ["The Answer.", "an answer!", "answer it"], [{"answer": "answer"}] * 3) == [1.0, 1.0, 0.0]
    assert _score("format", ["<think>a</think> 7", "7", "<think>a</think>  "], [{}] * 3) == [1.0, 0.0, 0.0]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def by_length(prompts, completions, answer=None, **kw):\n    return [len(c) > 2 for c in completions]\n"
        "def one_value(prompts, completions, **kw):\n    return [1.0]\n"
        "def raises(prompts, completions, **kw):\n    raise KeyError('answer')\n"
        "def skips(prompts, completions, **kw):\n    return [None, float('nan')]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("my_rewards", None)


def test_user_functions_get_the_rows_fields(user_module):
    assert _score("my_rewards:by_length", ["ab", "abcd"], [{"answer": "x"}, {"answer": "y"}]) == [0.0, 1.0]


@pytest.mark.parametrize("spec,says", [
    ("my_rewards:one_value", "reward my_rewards:one_value returned 1 values for 2 completions"),
    ("my_rewards:raises", "reward my_rewards:raises raised KeyError"),
    ("my_rewards:skips", "returned nan for completion 1"),
    ("my_rewards:nothere", "module 'my_rewards' has no function 'nothere'"),
    ("no_such_module_x:f", "cannot import 'no_such_module_x'"),
    ("numbers", "a reward is numeric, exact, format or module:function"),
])
def test_bad_rewards_are_one_error_naming_the_function(user_module, spec, says):
    with pytest.raises(GptlabError, match=says.replace("(", r"\(")):
        _score(spec, ["ab", "abcd"], [{"answer": "1"}, {"answer": "2"}])


def test_numeric_needs_an_answer():
    with pytest.raises(GptlabError, match="needs an 'answer' field"):
        _score("numeric", ["7"], [{"question": "?"}])
