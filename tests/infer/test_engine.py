"""The engine: continuous batching gives each request what it would get alone; blocks are shared, counted
and never leaked; preemption recomputes exactly; per-request sampling options and the thinking budget."""

from __future__ import annotations

import random

import pytest
import torch

import gptlab
from gptlab.errors import GptlabError
from gptlab.infer.engine import Engine, EngineConfig, QueueFull, parse_size
from gptlab.infer.generate import generate_ids
from gptlab.infer.sampling import Row, Sampling, sample_rows

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny_gpt2_dir):
    return gptlab.load(tiny_gpt2_dir)


@pytest.fixture(scope="module")
def tok(tiny_gpt2_dir):
    return gptlab.load_tokenizer(tiny_gpt2_dir)


def _prompts(n: int, seed: int = 0, vocab: int = 500) -> list[list[int]]:
    rnd = random.Random(seed)
    return [[rnd.randrange(1, vocab) for _ in range(rnd.randrange(3, 60))] for _ in range(n)]


def _alone(model, prompt, s):
    return generate_ids(model, [prompt], sampling=s)[0]


def drive(engine: Engine, arrivals: dict[int, list[tuple[list[int], Sampling]]]) -> tuple[list[str], int]:
    """Add requests at the given step numbers, run to the end; the request ids in arrival order, and the steps."""
    order, step = [], 0
    while arrivals or engine.has_unfinished():
        for prompt, s in arrivals.pop(step, []):
            order.append(engine.add_request(prompt, s))
        engine.step()
        step += 1
    return order, step


def _run(engine: Engine, arrivals: dict[int, list[tuple[list[int], Sampling]]]) -> dict[str, list[int]]:
    """drive(): {request id: tokens}, in arrival order."""
    order, _ = drive(engine, arrivals)
    return {r: engine.output(r).outputs[0].token_ids for r in order}


def test_greedy_output_is_what_each_request_gets_alone_whatever_the_batch(model):
    prompts = _prompts(9)
    samplings = [Sampling(max_new_tokens=8 + 3 * i, eos_id=[]) for i in range(9)]
    # a batch limit of 3, prompts prefilled in chunks of at most 16 tokens beside the decodes, and arrivals
    # at steps 0, 3 and 7 while others are mid-prompt or mid-answer
    engine = Engine(model, config=EngineConfig(max_batch=3, max_batched_tokens=16, num_blocks=64))
    got = _run(engine, {0: list(zip(prompts[:4], samplings[:4])), 3: list(zip(prompts[4:7], samplings[4:7])),
                        7: list(zip(prompts[7:], samplings[7:]))})
    for out, prompt, s in zip(got.values(), prompts, samplings):
        assert out == _alone(model, prompt, s)
    assert engine.blocks.num_free == engine.blocks.num_blocks  # everything finished: no block held


def test_preemption_recomputes_and_changes_nothing(model):
    prompts = _prompts(6, seed=1)
    s = Sampling(max_new_tokens=40, eos_id=[])
    engine = Engine(model, config=EngineConfig(max_batch=6, max_batched_tokens=64, block_size=4, num_blocks=40))
    got = _run(engine, {0: [(p, s) for p in prompts]})
    assert engine.scheduler.preemptions > 0  # 6 x ~70 tokens do not fit 160 slots at once
    for out, prompt in zip(got.values(), prompts):
        assert out == _alone(model, prompt, s)


def test_prefix_cache_reuses_shared_blocks_and_counts_them(model):
    engine = Engine(model, config=EngineConfig(block_size=16, num_blocks=32))
    system = list(range(10, 58))  # 48 tokens: three whole blocks
    s = Sampling(max_new_tokens=4, eos_id=[])
    first = engine.generate([system + [1, 2, 3]], s)[0]
    assert first.num_cached_tokens == 0
    second = engine.generate([system + [7, 8]], s)[0]
    assert second.num_cached_tokens == 48 and engine.blocks.hits == 48
    assert second.outputs[0].token_ids == _alone(model, system + [7, 8], s)  # reused keys give the same answer
    # n samples of one prompt: the first computes it, the others start from its cached blocks
    many = engine.generate([list(range(100, 140))], Sampling(max_new_tokens=3, temperature=1.0, seed=0, n=3))[0]
    assert len(many.outputs) == 3 and engine.blocks.hits == 48 + 2 * 32
    assert len({tuple(o.token_ids) for o in many.outputs}) > 1  # seeds seed, seed+1, seed+2 differ


def test_no_block_leaks_after_cancellations(model):
    engine = Engine(model, config=EngineConfig(max_batch=4, max_batched_tokens=24, num_blocks=48))
    rids = [engine.add_request(p, Sampling(max_new_tokens=30, eos_id=[])) for p in _prompts(10, seed=2)]
    for step in range(12):
        engine.step()
        if step == 3:
            engine.abort(rids[0])  # running
            engine.abort(rids[9])  # still waiting
        if step == 8:
            engine.abort(rids[5])
    engine.abort("no-such-request")
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_free == engine.blocks.num_blocks and sum(engine.blocks.ref) == 0
    assert engine.output(rids[1]).outputs[0].finish_reason == "length"
    assert all(r not in engine.requests or engine.output(r).finished for r in rids)


def test_seeded_sampling_is_the_same_whatever_else_runs(model):
    s = Sampling(max_new_tokens=20, temperature=0.9, top_k=40, top_p=0.95, min_p=0.01, seed=123, eos_id=[])
    prompt = _prompts(1, seed=3)[0]
    alone = _alone(model, prompt, s)
    engine = Engine(model, config=EngineConfig(max_batch=8, max_batched_tokens=32, num_blocks=64))
    others = [(p, Sampling(max_new_tokens=12, temperature=1.2, seed=i, eos_id=[])) for i, p in enumerate(_prompts(5, 4))]
    got = _run(engine, {0: others[:2], 1: [(prompt, s)], 2: others[2:]})
    assert list(got.values())[2] == alone
    assert _alone(model, prompt, s) == alone  # and again


def test_logprobs_are_the_models_distribution(model):
    prompt = [5, 6, 7, 8]
    out = Engine(model).generate([prompt], Sampling(max_new_tokens=3, logprobs=2, eos_id=[]))[0].outputs[0]
    with torch.no_grad():
        ref = model(torch.tensor([prompt]))[0, -1].float().log_softmax(-1)
    first = out.logprobs[0]
    assert first.logprob == pytest.approx(float(ref[out.token_ids[0]]), abs=1e-4)
    assert [t for t, _ in first.top] == ref.topk(2).indices.tolist() and len(out.logprobs) == 3


def test_penalties_and_min_p_act_per_row():
    logits = torch.tensor([[2.0, 1.9, 0.0, -3.0], [2.0, 1.9, 0.0, -3.0]])
    plain = Sampling(max_new_tokens=1)
    presence = Sampling(max_new_tokens=1, presence_penalty=1.0)
    rows = [Row(plain, [0, 0], 1), Row(presence, [3, 0], 1)]  # both generated token 0 once
    assert sample_rows(logits.clone(), rows)[0] == [0, 1]  # only the penalised row moves off token 0
    freq = Sampling(max_new_tokens=1, frequency_penalty=0.06)
    assert sample_rows(logits[:1].clone(), [Row(freq, [0, 0, 0], 1)])[0] == [1]  # 2 x 0.06 > 0.1
    g = torch.Generator().manual_seed(0)
    only_top = Sampling(max_new_tokens=1, temperature=1.0, min_p=0.9)
    picks = {sample_rows(logits[:1].clone(), [Row(only_top, [0], 1, g)])[0][0] for _ in range(50)}
    assert picks == {0, 1}  # p(1)/p(0) = 0.9: kept; the rest are far below min_p x p(0)


def test_limits_are_clear_errors(model):
    engine = Engine(model, config=EngineConfig(num_blocks=4, block_size=16, max_waiting=2))
    with pytest.raises(GptlabError, match="does not fit the KV cache"):
        engine.add_request(list(range(1, 60)), Sampling(max_new_tokens=20))
    with pytest.raises(GptlabError, match="exceeds the model's context"):
        engine.add_request(list(range(1, 120)), Sampling(max_new_tokens=20))
    engine.add_request([1, 2], Sampling(max_new_tokens=2))
    engine.add_request([1, 2], Sampling(max_new_tokens=2))
    with pytest.raises(QueueFull):
        engine.add_request([1, 2], Sampling(max_new_tokens=2))
    assert parse_size("1GiB") == 2**30 and parse_size("512MB") == 512 * 10**6 and parse_size(4096) == 4096
    with pytest.raises(GptlabError):
        parse_size("lots")


@pytest.fixture(scope="module")
def think_tok(corpus_text):
    """A tokenizer with <think> and </think> as single special tokens, as Qwen3's has."""
    from gptlab.tokenizer import train_tokenizer

    return train_tokenizer([corpus_text], vocab_size=512, special_tokens=["<|endoftext|>", "<think>", "</think>"],
                           show_progress=False)


def test_thinking_budget_forces_the_end_of_reasoning_within_max_tokens(model, think_tok):
    from gptlab.infer.thinking import EARLY_STOP, split_reasoning

    engine = Engine(model, think_tok)
    prompt = think_tok.encode("Question: why?\n<think>\n")  # the template opened the block for the model
    assert engine.opened_thinking(prompt)
    out = engine.generate([prompt], Sampling(max_new_tokens=90, eos_id=[], thinking_budget=5))[0].outputs[0]
    forced = list(engine.tags.early_stop)
    assert out.token_ids[5:5 + len(forced)] == forced and len(out.token_ids) == out.num_tokens == 90
    reasoning, answer = split_reasoning(out.text, opened=True)
    assert reasoning.endswith(EARLY_STOP.split("</think>")[0]) and "</think>" not in answer
    short = engine.generate([prompt], Sampling(max_new_tokens=10, eos_id=[], thinking_budget=5))[0].outputs[0]
    assert len(short.token_ids) == 10 and short.finish_reason == "length"  # the forced text is cut at max_tokens
    free = engine.generate([prompt], Sampling(max_new_tokens=30, eos_id=[]))[0].outputs[0]
    assert forced[0] not in free.token_ids[:1] or free.token_ids[:len(forced)] != forced  # no budget, no forcing
