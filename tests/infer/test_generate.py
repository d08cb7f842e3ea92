"""Generation behaviour: processors, stop rules, streaming, seeds, context limits, the CLI."""

from __future__ import annotations

import torch
import pytest

import gptlab
from gptlab.errors import GptlabError
from gptlab.infer.generate import TextRow, generate, generate_ids
from gptlab.infer.sampling import Sampling, apply_repetition_penalty, banned_ngram_tokens, top_k_filter, top_p_filter


@pytest.fixture(scope="module")
def model_and_tok(tiny_gpt2_dir):
    return gptlab.load(tiny_gpt2_dir), gptlab.load_tokenizer(tiny_gpt2_dir)


def test_top_k_keeps_exactly_k_most_likely():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = torch.isfinite(top_k_filter(logits, 2))
    assert kept.tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = torch.isfinite(top_p_filter(logits, 0.75)).tolist()[0]
    assert kept == [True, True, False, False]  # 0.5 alone < 0.75; 0.5 + 0.3 >= 0.75
    assert torch.isfinite(top_p_filter(logits, 0.01)).sum() == 1  # always at least one token


def test_repetition_penalty_matches_ctrl_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, -1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]  # seen positive divided, seen negative multiplied, unseen kept


def test_no_repeat_ngram_bans_completions_of_seen_ngrams():
    assert sorted(banned_ngram_tokens([1, 2, 3, 1, 2], 3)) == [3]
    assert banned_ngram_tokens([1, 2, 3], 3) == []
    assert sorted(banned_ngram_tokens([4, 5, 4], 1)) == [4, 5]


def test_no_repeat_ngram_holds_in_generated_text(model_and_tok):
    model, _ = model_and_tok
    out = generate_ids(model, [[5, 6, 7]], max_new_tokens=40, no_repeat_ngram_size=2, eos_id=[])[0]
    seq = [5, 6, 7] + out
    bigrams = list(zip(seq, seq[1:]))
    assert len(bigrams) == len(set(bigrams))


def test_seed_makes_sampling_reproducible(model_and_tok):
    model, tok = model_and_tok
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=50, seed=7)
    a, b = generate(model, tok, "The with statement", **kw), generate(model, tok, "The with statement", **kw)
    assert a == b
    others = {generate(model, tok, "The with statement", **{**kw, "seed": s}) for s in range(5)}
    assert len(others) > 1  # the seed, not something else, fixed the output


def test_streaming_pieces_join_to_the_full_text(model_and_tok):
    model, tok = model_and_tok
    kw = dict(max_new_tokens=30, temperature=0.9, seed=3)
    full = generate(model, tok, "for loops", **kw)
    pieces = list(generate(model, tok, "for loops", stream=True, **kw))
    assert "".join(pieces) == full
    assert len(pieces) > 1


def test_stop_string_ends_generation_and_is_excluded(model_and_tok):
    model, tok = model_and_tok
    free = generate(model, tok, "class", max_new_tokens=40, temperature=1.0, seed=1)
    stop = free[5:8]
    assert stop and stop in free
    cut = generate(model, tok, "class", max_new_tokens=40, temperature=1.0, seed=1, stop=[stop])
    assert cut == free[: free.find(stop)]


def test_text_row_holds_back_partial_utf8_and_partial_stop(tiny_tokenizer):
    text = "中文字符 and STOP here"
    ids = tiny_tokenizer.encode(text)
    row = TextRow(tiny_tokenizer, stop=["STOP"])
    pieces = [row.add(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)  # never half a character
    assert "".join(pieces) + row.rest() == "中文字符 and "


def test_eos_stops_a_row(model_and_tok):
    model, _ = model_and_tok
    first = generate_ids(model, [[5, 6, 7]], max_new_tokens=5, eos_id=[])[0]
    out = generate_ids(model, [[5, 6, 7]], max_new_tokens=5, eos_id=first[2])[0]
    assert out == first[:2]


def test_every_entry_point_stops_at_the_same_id(tiny_gpt2_dir):
    """generate() (text, with a tokenizer) and generate_ids() (ids, without one) follow one rule, stop_ids:
    the model's own eos_token_id comes before the tokenizer's, even when the two differ."""
    import copy

    model, tok = gptlab.load(tiny_gpt2_dir), gptlab.load_tokenizer(tiny_gpt2_dir)
    prompt = "The with statement"
    ids = tok.encode(prompt)
    free = generate_ids(model, [ids], max_new_tokens=12, eos_id=[])[0]
    stop = next(t for t in free[3:] if t != tok.eos_id)  # a token greedy decoding reaches, not the tokenizer's EOS
    model = copy.deepcopy(model)
    model.config.eos_token_id = stop
    assert tok.eos_id is not None and tok.eos_id != stop
    by_ids = generate_ids(model, [ids], max_new_tokens=12)[0]
    assert by_ids == free[:free.index(stop)]
    assert generate(model, tok, prompt, max_new_tokens=12) == tok.decode(by_ids)
    assert generate_ids(model, [ids], tokenizer=tok, max_new_tokens=12)[0] == by_ids
    streamed = "".join(generate(model, tok, prompt, max_new_tokens=12, stream=True))
    assert streamed == tok.decode(by_ids)


def test_prompt_longer_than_context_is_a_clear_error_or_truncated(model_and_tok):
    model, _ = model_and_tok
    long = list(range(1, 200))  # context is 128
    with pytest.raises(GptlabError, match="exceeds the model's context"):
        generate_ids(model, [long], max_new_tokens=10)
    out = generate_ids(model, [long], max_new_tokens=10, truncate=True, eos_id=[])[0]
    same = generate_ids(model, [long[-118:]], max_new_tokens=10, eos_id=[])[0]
    assert out == same


def test_bad_sampling_values_are_refused():
    for bad in (dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=1.5), dict(top_k=0)):
        with pytest.raises(GptlabError):
            Sampling(**bad)


def _greedy(model, prompt, n, cache=None):
    s = Sampling(max_new_tokens=n, eos_id=[])
    if cache is None:
        return generate_ids(model, [prompt], sampling=s)[0]
    out = cache.engine_for(model, None).generate([prompt], s)[0]
    cache.reused = out.num_cached_tokens
    return out.outputs[0].token_ids


def test_prompt_cache_prefills_only_new_tokens_and_matches_a_fresh_run(model_and_tok):
    """Reuse is by whole cached blocks (16 tokens) of what earlier calls computed: prompt and fed replies."""
    from gptlab.infer.generate import PromptCache

    model, _ = model_and_tok
    cache = PromptCache()
    first = list(range(5, 45))  # 40 tokens
    reply = _greedy(model, first, 6, cache)
    assert reply == _greedy(model, first, 6) and cache.reused == 0
    model(torch.tensor([first]))  # the model holds no cache between calls: plain forwards still work

    second = first + reply + [40, 41, 42]  # the conversation so far, then a new user turn
    assert _greedy(model, second, 6, cache) == _greedy(model, second, 6)
    computed = len(first) + len(reply) - 1  # the last reply token was sampled, never fed
    assert cache.reused == computed // 16 * 16 == 32

    third = first[:20] + [60, 61]  # diverges after 20 tokens: only the first whole block is reused
    assert _greedy(model, third, 4, cache) == _greedy(model, third, 4)
    assert cache.reused == 16

    cache.reset()
    assert _greedy(model, third, 4, cache) == _greedy(model, third, 4) and cache.reused == 0


def test_prompt_cache_takes_one_prompt(model_and_tok):
    from gptlab.infer.generate import PromptCache

    model, tok = model_and_tok
    with pytest.raises(GptlabError, match="one prompt"):
        generate(model, tok, ["a b", "c d"], max_new_tokens=2, cache=PromptCache())
