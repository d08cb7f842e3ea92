"""Speculative decoding: greedy output identical to the target alone, the rejection rule's output distributed as
the target's, cache bookkeeping across rounds (every accepted count), stop ids, and clear errors."""

from __future__ import annotations

import pytest
import torch

from gptlab.errors import GptlabError
from gptlab.infer.speculative import accept_or_resample, distribution, speculative_generate
from gptlab.models.config import Config
from gptlab.models.model import GPT


def _gpt(seed: int, layers: int = 2, width: int = 32, vocab: int = 61, **kw) -> GPT:
    torch.manual_seed(seed)
    # a wide init spreads the logits, so float rounding never turns a greedy choice (no near-ties)
    return GPT(Config(n_layer=layers, n_head=2, n_embd=width, context_length=96, vocab_size=vocab, init_std=0.3,
                      **kw)).eval()


@torch.no_grad()
def _greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding without a cache: the whole sequence through the model for every token."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("draft_seed", [0, 1])  # the target itself (all accepted), and an unrelated draft
def test_greedy_output_is_the_targets_own(k, draft_seed):
    target = _gpt(0)
    draft = _gpt(draft_seed) if draft_seed == 0 else _gpt(draft_seed, layers=1, width=16, positions="rotary")
    prompt = [3, 14, 15, 9, 26]
    out = speculative_generate(target, draft, prompt, max_new_tokens=40, k=k)
    assert out.token_ids == _greedy(target, prompt, 40)
    if draft_seed == 0:
        assert out.acceptance == 1.0 and out.rounds == -(-40 // (k + 1))
    else:
        assert out.proposed > 0 and out.acceptance < 1.0


def test_a_stop_id_ends_the_output():
    target = _gpt(0)
    ref = _greedy(target, [1, 2], 30)
    stop = ref[7]
    out = speculative_generate(target, _gpt(2, layers=1), [1, 2], max_new_tokens=30, k=4, eos_ids=(stop,))
    assert out.token_ids == ref[:ref.index(stop) + 1]


def test_rejection_rule_gives_the_targets_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g) * 2, 0)
    q = torch.softmax(torch.randn(6, generator=g) * 2, 0)
    counts = torch.zeros(6)
    n = 20000
    for _ in range(n):
        x = int(torch.multinomial(q, 1, generator=g))
        y = accept_or_resample(p, q, x, g)
        counts[x if y is None else y] += 1
    assert (counts / n - p).abs().max() < 0.015, (counts / n, p)
    assert accept_or_resample(p, p, 2, g) is None  # a draft equal to the target is always accepted


def test_sampling_is_seeded_and_keeps_top_k():
    target, draft = _gpt(0), _gpt(3, layers=1)
    a = speculative_generate(target, draft, [5, 6], max_new_tokens=30, k=3, temperature=0.9, top_k=5, seed=11)
    b = speculative_generate(target, draft, [5, 6], max_new_tokens=30, k=3, temperature=0.9, top_k=5, seed=11)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 30
    probs = distribution(torch.randn(61), 0.9, 5, None)
    assert int((probs > 0).sum()) == 5


def test_bad_requests_are_refused():
    target = _gpt(0)
    with pytest.raises(GptlabError, match="vocabulary"):
        speculative_generate(target, _gpt(1, vocab=80), [1], max_new_tokens=4)
    with pytest.raises(GptlabError, match="at least 1"):
        speculative_generate(target, target, [1], max_new_tokens=4, k=0)
    with pytest.raises(GptlabError, match="exceed the context"):
        speculative_generate(target, target, [1] * 90, max_new_tokens=10)
    with pytest.raises(GptlabError, match="prompt"):
        speculative_generate(target, target, [], max_new_tokens=4)


def test_generate_command_with_a_draft(tiny_gpt2_dir, capsys):
    from gptlab import cli

    args = ["generate", str(tiny_gpt2_dir), "--prompt", "The with", "--max-new-tokens", "8", "--temperature", "0"]
    assert cli.main(args + ["--draft", str(tiny_gpt2_dir), "--draft-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("The with") and "8/8 proposals accepted (100%)" not in out.err  # 7 proposed at most
    assert "proposals accepted" in out.err
    # on the engine: several prompts, samples and stop strings take the draft too
    assert cli.main(args[:2] + ["--prompt", "The with", "A class", "--max-new-tokens", "8", "--num-samples", "2",
                                "--stop", "zz", "--draft", str(tiny_gpt2_dir)]) == 0
    out = capsys.readouterr()
    assert out.out.count("--- sample") == 4 and "proposals accepted" in out.err
    assert cli.main(args + ["--draft", str(tiny_gpt2_dir), "--stream"]) == 1
    assert "drop --stream" in capsys.readouterr().err
    assert cli.main(args + ["--quantize", "int8"]) == 0  # integer weights through the same command
    assert capsys.readouterr().out.startswith("The with")
