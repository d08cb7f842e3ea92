"""LAMBADA: predict the last word of a passage (Paperno et al. 2016), scored as the harness's
lambada_openai task scores it (lm_eval/tasks/lambada/lambada_openai.yaml):

    context = the text up to its last space       (text.split(" ")[:-1] joined by " ")
    target  = " " + the last word                 (one or more tokens)
    acc        = mean over passages of [greedy decoding reproduces every target token]
    perplexity = exp(-mean over passages of log p(target | context))

So a word is right only if each of its tokens is the argmax given the context and the target's earlier
tokens. The stderr of acc is the sample standard error; that of perplexity a bootstrap, as in the harness.
"""

from __future__ import annotations

from gptlab.eval.data import Doc, require, where
from gptlab.eval.results import EvalResult, bootstrap_stderr, mean_stderr, perplexity
from gptlab.eval.scorer import Scorer
from gptlab.errors import GptlabError


def split_last_word(text: str) -> tuple[str, str]:
    """(context, " " + last word), splitting on single spaces exactly as the harness's Jinja template does."""
    words = text.split(" ")
    return " ".join(words[:-1]), " " + words[-1]


def evaluate_lambada(scorer: Scorer, docs: list[Doc], field: str = "text", bootstrap_iters: int = 1000,
                     source: str = "data") -> EvalResult:
    pairs = []
    for i, d in enumerate(docs):
        text = require(d, field, str, where(source, d, i))
        if " " not in text:
            raise GptlabError(f"{where(source, d, i)}: a LAMBADA passage needs at least two words")
        pairs.append(split_last_word(text))
    if not pairs:
        raise GptlabError(f"{source}: no passages to evaluate")
    seconds, tokens = scorer.seconds, scorer.tokens
    scores = scorer.loglikelihood(pairs, desc="lambada")
    lls = [s for s, _ in scores]
    hits = [float(g) for _, g in scores]
    metrics = {"acc": sum(hits) / len(hits), "perplexity": perplexity(lls)}
    stderr = {"acc": mean_stderr(hits), "perplexity": bootstrap_stderr(perplexity, lls, bootstrap_iters)}
    samples = [{"target": t, "loglikelihood": ll, "correct": bool(h)} for (_, t), ll, h in zip(pairs, lls, hits)]
    return EvalResult(task="lambada", metrics=metrics, stderr=stderr, n=len(pairs),
                      seconds=scorer.seconds - seconds, tokens=scorer.tokens - tokens, samples=samples)
