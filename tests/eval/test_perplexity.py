"""Perplexity: the window arithmetic, the formulas, and what the stride does.

The stride test needs a model that uses its context, which random weights do not. Rather than train one,
`cache_model` builds it by hand: one attention head with zero queries and keys attends uniformly to the
context, so the logits score each token by how often it appeared before (a unigram cache). On text drawn
in long stretches from small sets of tokens, more context must then mean better predictions.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

import gptlab
from gptlab import GPT, Config
from gptlab.eval import evaluate
from gptlab.eval.perplexity import count_words, evaluate_perplexity, wikitext_detokenize
from gptlab.eval.scorer import Scorer


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


@pytest.fixture(scope="module")
def scorer(tiny_gpt2_dir):
    return Scorer(gptlab.load(tiny_gpt2_dir), gptlab.load_tokenizer(tiny_gpt2_dir), batch_size=8, progress=False)


@pytest.mark.parametrize("N,W,S", [(1, 8, 8), (7, 8, 8), (8, 8, 8), (9, 8, 8), (50, 8, 8), (50, 8, 3), (50, 8, 1),
                                   (23, 5, 4), (100, 16, 7)])
def test_windows_predict_every_token_once_with_the_promised_context(scorer, N, W, S):
    tokens = list(range(1, N + 1))  # token value = its position, so positions can be read back
    seen = []
    for ctx, cont in scorer.rolling_requests(tokens, window=W, stride=S):
        inp = (ctx + cont)[:-1]
        assert len(inp) <= W
        for k, target in enumerate(cont):
            context = len(ctx) + k  # tokens before `target` in this window
            assert context >= min(target, W - S + 1)  # x_0 is the prefix token, so t_j has j tokens before it
            seen.append(target)
    assert seen == tokens


@pytest.mark.parametrize("N", [1, 5, 64, 200, 513])
def test_stride_equal_to_window_gives_the_harness_disjoint_windows(scorer, N):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = [random.Random(N).randrange(1, 500) for _ in range(N)]
    W = 64
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, scorer.prefix_id, W, 1)]
    assert scorer.rolling_requests(tokens, window=W, stride=W) == [(list(a), list(b)) for a, b in theirs]


def test_stride_equal_to_window_equals_the_default_disjoint_result(tiny_gpt2_dir, corpus_text, tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(corpus_text[:3000])
    default = evaluate(tiny_gpt2_dir, "perplexity", path, progress=False)
    explicit = evaluate(tiny_gpt2_dir, "perplexity", path, window=128, stride=128, progress=False)
    assert explicit.metrics == default.metrics
    assert default.config["windows"] > 3


def test_one_window_is_the_plain_cross_entropy(scorer, corpus_text):
    """A text shorter than the context: token perplexity = exp(mean cross-entropy of one forward pass)."""
    text = corpus_text[:300]
    ids = scorer.encode(text)
    assert len(ids) < 128
    x = torch.tensor([[scorer.prefix_id] + ids])
    with torch.no_grad():
        nll = F.cross_entropy(scorer.model(x[:, :-1])[0], x[0, 1:], reduction="sum").item()
    r = evaluate_perplexity(scorer, [{"text": text}])
    assert r.metrics["token_perplexity"] == pytest.approx(math.exp(nll / len(ids)), rel=1e-5)
    assert r.metrics["word_perplexity"] == pytest.approx(math.exp(nll / count_words(text)), rel=1e-5)
    assert r.metrics["byte_perplexity"] == pytest.approx(math.exp(nll / len(text.encode())), rel=1e-5)
    assert r.metrics["bits_per_byte"] == pytest.approx(math.log2(r.metrics["byte_perplexity"]), rel=1e-9)


def cache_model(vocab_size: int, context_length: int = 64, k: int = 32) -> GPT:
    """A unigram cache: p(next = j) ∝ exp(2 <E_j, mean of E over the context>), built from one GPT block."""
    cfg = Config(vocab_size=vocab_size, context_length=context_length, n_layer=1, n_head=1, n_embd=2 * k, norm="rmsnorm",
                 tie_embeddings=False, qkv_bias=False, attn_out_bias=False, mlp_bias=False)
    model = GPT(cfg)
    E = torch.randn(vocab_size, k, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # zero queries and keys: uniform attention over the causal context; no MLP, no positions
        for norm in (model.blocks[0].norm_1, model.blocks[0].norm_2, model.norm_f):
            norm.weight.fill_(1.0)
        model.wte.weight[:, :k] = E  # token identity in the first k channels
        model.blocks[0].attn.qkv.weight[4 * k: 5 * k, :k] = torch.eye(k)  # values = token identity
        model.blocks[0].attn.proj.weight[k:, :k] = torch.eye(k)  # the context mean goes to the last k channels
        model.lm_head.weight[:, k:] = 2.0 * E  # logits read only the context mean
    return model.eval()


def test_smaller_strides_give_lower_or_equal_perplexity(tiny_tokenizer):
    model = cache_model(tiny_tokenizer.vocab_size)
    g = torch.Generator().manual_seed(1)
    tokens = []
    for _ in range(6):  # stretches of 300 tokens, each drawn from its own 6 tokens
        subset = torch.randperm(tiny_tokenizer.vocab_size - 1, generator=g)[:6] + 1
        tokens += subset[torch.randint(6, (300,), generator=g)].tolist()
    scorer = Scorer(model, tiny_tokenizer, batch_size=64, progress=False)
    ppl = {}
    for stride in (32, 24, 16, 8, 4, 1):
        scores = scorer.loglikelihood_tokens(scorer.rolling_requests(tokens, window=32, stride=stride))
        ppl[stride] = math.exp(-sum(lp for lp, _ in scores) / len(tokens))
    strides = sorted(ppl, reverse=True)
    for wide, narrow in zip(strides, strides[1:]):
        assert ppl[narrow] <= ppl[wide] * (1 + 1e-9), ppl
    assert ppl[1] < 0.5 * ppl[32], ppl  # the disjoint windows' first tokens see almost no context


def test_wikitext_detokenizer_and_counts_on_the_original(scorer):
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    raw = (" = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor . "
           "He had a 1 @,@ 000 @-@ seat role in ( 2000 ) . ")
    assert wikitext_detokenize(raw) == (
        " = Robert Boulter =\nRobert Boulter is an English film, television and theatre actor. "
        "He had a 1,000-seat role in (2000). "
    )
    assert wikitext_detokenize(raw) == wikitext_detokenizer({"page": raw})
    r = evaluate_perplexity(scorer, [{"text": raw}], detokenize="wikitext")
    # the harness scores the detokenized text but divides by the words and bytes of the original
    assert r.details["words"] == count_words(raw) and r.details["bytes"] == len(raw.encode())
    assert r.details["tokens"] == len(scorer.encode(wikitext_detokenize(raw)))
