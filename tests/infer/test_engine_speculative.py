"""Speculative decoding inside the engine: greedy output token for token what the engine gives without the draft
(requests joining and leaving, chunked prefill, prefix-cache hits, preemption, k = 1 and k > 1, a draft that
agrees and one that does not), sampled output distributed as the target's, seeded requests reproducible, stops
cutting a verified run where plain decoding stops, and requests the rule cannot honour decoding plainly."""

from __future__ import annotations

import random

import pytest
import torch

import gptlab
from gptlab.errors import GptlabError
from gptlab.infer.engine import Engine, EngineConfig
from gptlab.infer.sampling import Sampling
from gptlab.infer.speculative import check_draft, speculative_generate
from gptlab.models.config import Config
from gptlab.models.model import GPT
from tests.infer.test_engine import drive

pytestmark = pytest.mark.usefixtures("one_thread")


def _gpt(seed: int, layers: int = 2, width: int = 32, vocab: int = 61, context: int = 128, init_std: float = 0.3,
         **kw) -> GPT:
    torch.manual_seed(seed)
    # a wide init spreads the logits, so float rounding never turns a greedy choice (no near-ties)
    return GPT(Config(n_layer=layers, n_head=2, n_embd=width, context_length=context, vocab_size=vocab,
                      init_std=init_std, **kw)).eval()


@pytest.fixture(scope="module")
def target() -> GPT:
    return _gpt(0)


@pytest.fixture(scope="module")
def other() -> GPT:
    """An unrelated draft (another shape, rotary positions, a smaller vocabulary): most proposals rejected."""
    return _gpt(1, layers=1, width=16, vocab=50, positions="rotary")


def _prompts(n: int, seed: int, vocab: int = 61, longest: int = 40) -> list[list[int]]:
    rnd = random.Random(seed)
    return [[rnd.randrange(1, vocab) for _ in range(rnd.randrange(3, longest))] for _ in range(n)]


def _run(engine: Engine, arrivals: dict[int, list[tuple[list[int], Sampling]]]) -> tuple[list, int]:
    """drive(): the outputs in arrival order, and the steps."""
    order, steps = drive(engine, arrivals)
    return [engine.output(r).outputs[0] for r in order], steps


def _arrivals(prompts, samplings):
    pairs = list(zip(prompts, samplings))
    return {0: pairs[:3], 3: pairs[3:5], 7: pairs[5:]}  # joining while others are mid-prompt or mid-answer


def _acceptance(engine: Engine) -> tuple[int, int]:
    s = engine.stats()
    return s["spec_accepted_tokens"], s["spec_draft_tokens"]


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("which", ["itself", "other"])
def test_greedy_with_a_draft_is_the_engine_without_one(target, other, k, which):
    draft = target if which == "itself" else other
    prompts = _prompts(8, seed=k)
    samplings = [Sampling(max_new_tokens=5 + 6 * i, eos_id=[]) for i in range(8)]  # leaving at different steps
    cfg = dict(max_batch=3, max_batched_tokens=16, num_blocks=64, block_size=8)  # prompts in chunks of <= 16
    plain, plain_steps = _run(Engine(target, config=EngineConfig(**cfg)), _arrivals(prompts, samplings))
    engine = Engine(target, config=EngineConfig(**cfg, draft_tokens=k), draft=draft)
    got, steps = _run(engine, _arrivals(prompts, samplings))
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    assert [o.num_tokens for o in got] == [o.num_tokens for o in plain]
    ref = speculative_generate(target, draft, prompts[-1], max_new_tokens=samplings[-1].max_new_tokens, k=k)
    assert ref.token_ids == got[-1].token_ids  # and what the dense one-sequence reference gives
    accepted, proposed = _acceptance(engine)
    if which == "itself":  # the draft's pool holds exactly the target's keys: every proposal is kept
        assert proposed > 0 and accepted == proposed and steps < plain_steps
    else:
        assert proposed > 0 and accepted < proposed
    assert engine.blocks.num_free == engine.blocks.num_blocks and sum(engine.blocks.ref) == 0


def test_prefix_cache_hits_and_preemption_with_a_draft(target):
    system = list(range(1, 25))  # three whole blocks of 8 shared by every prompt
    prompts = [system + p for p in _prompts(6, seed=5, longest=12)]
    s = Sampling(max_new_tokens=30, eos_id=[])
    cfg = dict(max_batch=6, max_batched_tokens=64, block_size=8, num_blocks=24)  # 6 x ~60 tokens in 192 slots
    plain = Engine(target, config=EngineConfig(**cfg)).generate(prompts, s)
    engine = Engine(target, config=EngineConfig(**cfg, draft_tokens=3), draft=target)
    got = engine.generate(prompts, s)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in plain]
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    # recomputed and cache-hit blocks hold the draft's keys too: the target as its own draft keeps everything
    accepted, proposed = _acceptance(engine)
    assert proposed > 0 and accepted == proposed
    # a later request that starts with an earlier one's prompt and reply reuses those blocks for both models
    again = system + got[0].outputs[0].token_ids[:8]
    out = engine.generate([again], Sampling(max_new_tokens=12, eos_id=[]))[0]
    assert out.num_cached_tokens >= 24 and _acceptance(engine)[0] == _acceptance(engine)[1]


def _exact_marginals(model: GPT, prompt: list[int], steps: int, temperature: float, top_k: int) -> list[torch.Tensor]:
    """The model's sampled distribution of each of the next `steps` tokens (summed over every earlier choice)."""
    V = model.config.vocab_size
    prefixes, weights = [list(prompt)], torch.ones(1)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor(prefixes))[:, -1].float() / temperature  # (P, V)
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            p = logits.masked_fill(logits < kth, float("-inf")).softmax(-1)
            joint = weights[:, None] * p  # (P, V)
            out.append(joint.sum(0))
            prefixes = [pre + [t] for pre in prefixes for t in range(V)]
            weights = joint.flatten()
    return out


def test_sampled_output_has_the_targets_distribution():
    # flatter distributions than the greedy tests' (init 0.1): the rule keeps some proposals and rejects others
    target, draft = _gpt(2, vocab=8, init_std=0.1), _gpt(3, layers=1, vocab=8, init_std=0.1)
    prompt, T, top_k, n = [1, 2, 3], 1.0, 6, 2400
    exact = _exact_marginals(target, prompt, 4, T, top_k)
    drafts = _exact_marginals(draft, prompt, 4, T, top_k)
    assert (drafts[1] - exact[1]).abs().max() > 0.1  # the draft alone would be visibly off: the check has power
    engine = Engine(target, config=EngineConfig(max_batch=400, max_batched_tokens=4096, num_blocks=1300,
                                                block_size=4, max_waiting=n, draft_tokens=2), draft=draft)
    samplings = [Sampling(max_new_tokens=4, temperature=T, top_k=top_k, seed=i, eos_id=[]) for i in range(n)]
    outs = [o.outputs[0].token_ids for o in engine.generate([prompt] * n, samplings)]
    accepted, proposed = _acceptance(engine)
    assert 0.3 * proposed < accepted < 0.9 * proposed  # both branches of the rule run
    for pos in range(1, 4):  # the tokens the rule chose (the first comes from the prefill's plain sampling)
        seen = torch.bincount(torch.tensor([o[pos] for o in outs]), minlength=8).float() / n
        assert (seen - exact[pos]).abs().max() < 0.035, (pos, seen, exact[pos])


def test_a_seeded_request_is_reproducible_with_a_draft(target, other):
    s = Sampling(max_new_tokens=24, temperature=0.9, top_k=20, top_p=0.95, min_p=0.02, seed=7, eos_id=[])
    prompt = _prompts(1, seed=9)[0]

    def alone():
        engine = Engine(target, config=EngineConfig(num_blocks=64, draft_tokens=3), draft=other)
        return engine.generate([prompt], s)[0].outputs[0].token_ids

    first = alone()
    assert len(first) == 24 and alone() == first
    engine = Engine(target, config=EngineConfig(max_batch=8, num_blocks=128, draft_tokens=3), draft=other)
    others = [(p, Sampling(max_new_tokens=15, temperature=1.2, seed=i, eos_id=[]))
              for i, p in enumerate(_prompts(4, 10))]
    got, _ = _run(engine, {0: others[:2], 1: [(prompt, s)], 3: others[2:]})
    assert got[2].token_ids == first


def test_stops_cut_a_verified_run_where_plain_decoding_stops(tiny_gpt2_dir):
    model, tok = gptlab.load(tiny_gpt2_dir), gptlab.load_tokenizer(tiny_gpt2_dir)
    prompt = tok.encode("The with statement")
    free = Engine(model, tok).generate([prompt], Sampling(max_new_tokens=40, eos_id=[]))[0].outputs[0]
    stop_text = free.text[len(free.text) // 2:][:3]
    cases = [Sampling(max_new_tokens=40, eos_id=[], stop=[stop_text]),  # a stop string inside a kept run
             Sampling(max_new_tokens=40, eos_id=[free.token_ids[13]]),  # EOS inside a kept run
             Sampling(max_new_tokens=11, eos_id=[]),  # max_tokens not a multiple of k + 1
             Sampling(max_new_tokens=7, eos_id=[])]
    long_prompt = (prompt * 40)[:128 - 7]  # prompt + max_tokens = the whole context
    prompts = [prompt] * 3 + [long_prompt]
    plain = Engine(model, tok).generate(prompts, cases)
    engine = Engine(model, tok, EngineConfig(draft_tokens=5), draft=model)
    got = engine.generate(prompts, cases)
    for a, b in zip(got, plain):
        a, b = a.outputs[0], b.outputs[0]
        assert (a.token_ids, a.text, a.finish_reason, a.num_tokens) == \
            (b.token_ids, b.text, b.finish_reason, b.num_tokens)
    assert [o.outputs[0].finish_reason for o in got] == ["stop", "stop", "length", "length"]
    assert engine.stats()["generated_tokens"] == sum(o.outputs[0].num_tokens for o in plain)
    # the simple API takes a draft too
    text = gptlab.generate(model, tok, "The with statement", max_new_tokens=20, draft=model, draft_tokens=3)
    assert text == gptlab.generate(model, tok, "The with statement", max_new_tokens=20)


def test_requests_the_rule_cannot_honour_decode_plainly_beside_the_others(target, other):
    from gptlab.infer.speculative import speculates
    from gptlab.infer.structured import Constraint

    assert speculates(Sampling(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, stop=["x"], n=3, seed=1))
    assert not speculates(Sampling(constraint=Constraint.regex("a+"))) and not speculates(Sampling(thinking_budget=4))
    prompts = _prompts(4, seed=11)
    samplings = [Sampling(max_new_tokens=12, eos_id=[], **kw) for kw in (
        dict(logprobs=2), dict(repetition_penalty=1.3), dict(no_repeat_ngram_size=2),
        dict(presence_penalty=0.5, frequency_penalty=0.5))]
    plain = Engine(target).generate(prompts, samplings)
    engine = Engine(target, config=EngineConfig(draft_tokens=3), draft=other)
    got = engine.generate(prompts, samplings)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in plain]
    assert len(got[0].outputs[0].logprobs) == 12 and engine.stats()["spec_drafts"] == 0
    both = engine.generate(prompts[:2], [samplings[0], Sampling(max_new_tokens=12, eos_id=[])])
    assert both[0].outputs[0].token_ids == plain[0].outputs[0].token_ids and engine.stats()["spec_drafts"] > 0


def test_a_draft_that_cannot_serve_the_target_is_refused(target, tiny_tokenizer, corpus_text):
    from gptlab.tokenizer import train_tokenizer

    with pytest.raises(GptlabError, match="vocabulary"):
        Engine(target, draft=_gpt(1, vocab=80))
    with pytest.raises(GptlabError, match="context"):
        Engine(target, draft=_gpt(1, context=64))
    with pytest.raises(GptlabError, match="draft-tokens must be an integer in"):
        EngineConfig(draft_tokens=0)
    other_tok = train_tokenizer([corpus_text[:50_000]], vocab_size=400, show_progress=False)
    small = Config(n_layer=1, n_head=1, n_embd=8, context_length=128, vocab_size=512)
    with pytest.raises(GptlabError, match="does not share the model's tokenizer"):
        check_draft(small, small, tiny_tokenizer, other_tok)
    check_draft(small, small, tiny_tokenizer, tiny_tokenizer)
