"""The loglikelihood scorer: its fast paths give the definition's numbers.

The definition: log p(continuation | context) = sum over continuation tokens of log_softmax of one plain
forward pass over (context + continuation)[-(context_len + 1):][:-1]. The scorer's shared-context path (one
prefill, KV cache re-indexed per continuation), its head-only-at-scored-positions path and its batching
must all reproduce it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gptlab
from gptlab.errors import GptlabError
from gptlab.eval.scorer import Scorer


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


@pytest.fixture(scope="module")
def scorer(tiny_gpt2_dir):
    return Scorer(gptlab.load(tiny_gpt2_dir), gptlab.load_tokenizer(tiny_gpt2_dir), batch_size=4, progress=False)


def reference(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    L = model.config.context_length
    full = (ctx + cont)[-(L + 1):]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([full[:-1]]))[0].float(), dim=-1)[-len(cont):]
    target = torch.tensor(cont)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def requests(tok) -> list[tuple[list[int], list[int]]]:
    ctx = tok.encode("The try statement specifies exception handlers")
    other = tok.encode("A class definition defines a class object")
    conts = [tok.encode(t) for t in (" and cleanup code", " for", " x", " in a group of statements")]
    long_ctx = tok.encode(" ".join(["the module namespace"] * 60))  # > 128 tokens: truncated on the left
    reqs = [(ctx, c) for c in conts] + [(other, c) for c in conts[:2]] + [(other, conts[3])]
    reqs += [(long_ctx, conts[0]), (long_ctx, conts[3]), (ctx, conts[0])]  # the last one repeats the first
    # a long context and a short one with long continuations: together they would overflow the 128-slot cache
    near_full, short = long_ctx[:110], tok.encode("Note")
    reqs += [(near_full, conts[1]), (near_full, conts[2]), (short, long_ctx[:70]), (short, long_ctx[5:60])]
    return reqs


def test_every_path_reproduces_the_definition(scorer):
    reqs = requests(scorer.tokenizer)
    expected = [reference(scorer.model, c, x) for c, x in reqs]
    for batch_size in (1, 2, 5, 100):
        scorer.batch_size = batch_size
        together = scorer.loglikelihood_tokens(reqs)  # shared contexts: one prefill per context
        alone = [scorer.loglikelihood_tokens([r])[0] for r in reqs]  # every request on its own path
        for got in (together, alone):
            for (lp, greedy), (ref_lp, ref_greedy) in zip(got, expected):
                assert lp == pytest.approx(ref_lp, rel=1e-5, abs=1e-4)
                assert greedy == ref_greedy


def test_output_head_chunks_do_not_change_scores(scorer, monkeypatch):
    import gptlab.eval.scorer as module

    reqs = requests(scorer.tokenizer)
    scorer.batch_size = 8
    whole = scorer.loglikelihood_tokens(reqs)
    monkeypatch.setattr(module, "HEAD_ROWS", 3)  # many chunks, some ragged
    chunked = scorer.loglikelihood_tokens(reqs)
    assert [g for _, g in chunked] == [g for _, g in whole]
    assert [lp for lp, _ in chunked] == pytest.approx([lp for lp, _ in whole], rel=1e-6)


def test_identical_requests_run_once(scorer):
    reqs = requests(scorer.tokenizer)
    before = scorer.tokens
    scorer.loglikelihood_tokens(reqs[:1])
    once = scorer.tokens - before
    before = scorer.tokens
    out = scorer.loglikelihood_tokens(reqs[:1] * 5)
    assert scorer.tokens - before == once
    assert len(set(out)) == 1 and len(out) == 5


def test_encode_pair_follows_the_harness(scorer):
    tok = scorer.tokenizer
    # trailing spaces of the context move to the continuation
    ctx, cont = scorer.encode_pair("The value is  ", "42")
    assert ctx == tok.encode("The value is") and tok.decode(cont) == "  42"
    # an empty context is the prefix token (BOS, else EOS)
    ctx, cont = scorer.encode_pair("", " hello")
    assert ctx == [scorer.prefix_id] and cont == tok.encode(" hello")
    # the continuation is the joint encoding minus as many tokens as the context has on its own
    for context, continuation in (("import", "lib"), ("def", "ault"), ("The with", " statement")):
        ctx, cont = scorer.encode_pair(context, continuation)
        whole = tok.encode(context + continuation)
        assert ctx == tok.encode(context) and cont == whole[len(ctx):]


def test_bad_requests_are_clear_errors(scorer):
    with pytest.raises(GptlabError, match="empty continuation"):
        scorer.loglikelihood_tokens([([1, 2], [])])
    with pytest.raises(GptlabError, match="exceeds the context"):
        scorer.loglikelihood_tokens([([1], [5] * 200)])
    with pytest.raises(GptlabError, match="stride"):
        scorer.rolling_requests([1, 2, 3], window=8, stride=9)
