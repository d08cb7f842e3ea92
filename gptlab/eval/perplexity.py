"""Perplexity of a text: per token, per word, per byte, and bits per byte.

For a document of N tokens t_1..t_N (encoded as the harness encodes it) with x_0 the prefix token (BOS, else
EOS), LL = sum_i log p(t_i | context_i), and over a set of documents

    token_perplexity = exp(-sum LL / sum N)
    word_perplexity  = exp(-sum LL / sum words)     words = len(re.split(r"\\s+", text))
    byte_perplexity  = exp(-sum LL / sum bytes)     bytes = len(text.encode("utf-8"))
    bits_per_byte    = -sum LL / sum bytes / ln 2

(lm-evaluation-harness's `weighted_perplexity` and `bits_per_byte` aggregations; with the WikiText
detokenizer, words and bytes are counted on the original text, as the harness's wikitext task does.)

context_i depends on the window W (default: the model's context) and stride S (default W), see
`Scorer.rolling_requests`: windows end at e_k = min(W + k*S, N), each reads at most W tokens, and scores
only the tokens no earlier window scored. S = W gives the harness's disjoint windows
(`loglikelihood_rolling`); S < W gives every scored token at least W - S tokens of context (the GPT-2
paper's and transformers' sliding-window perplexity), at about W/S times the compute.
"""

from __future__ import annotations

import math
import re

from gptlab.eval.data import Doc, require, where
from gptlab.eval.results import EvalResult
from gptlab.eval.scorer import Scorer
from gptlab.errors import GptlabError


def wikitext_detokenize(string: str) -> str:
    """Undo WikiText's tokenisation (" @-@ ", " , ", ...): lm_eval/tasks/wikitext/preprocess_wikitext.py,
    itself from the GPT-2 paper's evaluation (Radford et al. 2019, sec. 3.1 "invertible de-tokenizers")."""
    # contractions
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    # number separators
    string = string.replace(" @-@ ", "-")
    string = string.replace(" @,@ ", ",")
    string = string.replace(" @.@ ", ".")
    # punctuation
    string = string.replace(" : ", ": ")
    string = string.replace(" ; ", "; ")
    string = string.replace(" . ", ". ")
    string = string.replace(" ! ", "! ")
    string = string.replace(" ? ", "? ")
    string = string.replace(" , ", ", ")
    # double brackets
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    # miscellaneous
    string = string.replace("= = = =", "====")
    string = string.replace("= = =", "===")
    string = string.replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n")
    string = string.replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    string = string.replace(" 's", "'s")
    return string


DETOKENIZERS = {"none": None, "wikitext": wikitext_detokenize}


def count_words(text: str) -> int:
    """Words as the harness counts them (`Task.count_words`): pieces between runs of whitespace."""
    return len(re.split(r"\s+", text))


def evaluate_perplexity(
    scorer: Scorer,
    docs: list[Doc],
    window: int | None = None,
    stride: int | None = None,
    detokenize: str = "none",
    field: str = "text",
    source: str = "data",
) -> EvalResult:
    """Perplexity of each doc's `field`, all windows of all documents scored as one batched run."""
    if detokenize not in DETOKENIZERS:
        raise GptlabError(f"unknown detokenizer {detokenize!r} (choose from {', '.join(DETOKENIZERS)})")
    detok = DETOKENIZERS[detokenize]
    texts = [require(d, field, str, where(source, d, i)) for i, d in enumerate(docs)]
    if not texts:
        raise GptlabError(f"{source}: no documents to evaluate")
    requests, owner, n_tokens = [], [], []
    for i, text in enumerate(texts):
        ids = scorer.encode(detok(text) if detok else text)
        reqs = scorer.rolling_requests(ids, window, stride)
        requests += reqs
        owner += [i] * len(reqs)
        n_tokens.append(len(ids))
    seconds, tokens = scorer.seconds, scorer.tokens
    scores = scorer.loglikelihood_tokens(requests, desc="perplexity windows")
    ll = [0.0] * len(texts)
    for i, (lp, _) in zip(owner, scores):
        ll[i] += lp
    words = [count_words(t) for t in texts]  # counted on the original text, as the harness does for WikiText
    nbytes = [len(t.encode("utf-8")) for t in texts]
    total = sum(ll)
    T, Wd, B = sum(n_tokens), sum(words), sum(nbytes)
    metrics = {
        "token_perplexity": math.exp(-total / T) if T else math.nan,
        "word_perplexity": math.exp(-total / Wd),
        "byte_perplexity": math.exp(-total / B) if B else math.nan,
        "bits_per_byte": -total / B / math.log(2) if B else math.nan,
    }
    samples = [{"loglikelihood": l, "tokens": t, "words": w, "bytes": b}
               for l, t, w, b in zip(ll, n_tokens, words, nbytes)]
    return EvalResult(
        task="perplexity", metrics=metrics, stderr={k: None for k in metrics}, n=len(texts),
        seconds=scorer.seconds - seconds, tokens=scorer.tokens - tokens,
        config={"window": window or scorer.context_length, "stride": stride or window or scorer.context_length,
                "detokenize": detokenize, "windows": len(requests)},
        details={"loglikelihood": total, "tokens": T, "words": Wd, "bytes": B}, samples=samples,
    )


def evaluate_perplexity_windows(scorer: Scorer, docs: list[Doc], windows: list[int], stride: int | None = None,
                                detokenize: str = "none", field: str = "text", source: str = "data") -> EvalResult:
    """Perplexity of the same documents at each window size (a long-context check: does more context help, and
    where does it stop helping). Metrics: the largest window's, plus `token_perplexity@W` and `bits_per_byte@W`
    for every W; details["windows"] holds each window's metrics; `plot_windows` draws them."""
    if len(set(windows)) != len(windows):
        raise GptlabError(f"--window sizes must be distinct, got {windows}")
    windows = sorted(windows)
    too_long = [w for w in windows if w > scorer.context_length]
    if too_long:
        raise GptlabError(f"window {too_long[0]} is past the model's context ({scorer.context_length} tokens)")
    if stride is not None and stride > windows[0]:
        raise GptlabError(f"stride {stride} is larger than the smallest window {windows[0]}")
    results = [evaluate_perplexity(scorer, docs, window=w, stride=stride, detokenize=detokenize, field=field,
                                   source=source) for w in windows]
    last = results[-1]
    metrics = dict(last.metrics)
    for w, r in zip(windows, results):
        metrics[f"token_perplexity@{w}"] = r.metrics["token_perplexity"]
        metrics[f"bits_per_byte@{w}"] = r.metrics["bits_per_byte"]
    per_window = [{"window": w, "stride": r.config["stride"], "windows": r.config["windows"], **r.metrics}
                  for w, r in zip(windows, results)]
    return EvalResult(
        task="perplexity", metrics=metrics, stderr={k: None for k in metrics}, n=last.n,
        seconds=sum(r.seconds for r in results), tokens=sum(r.tokens for r in results),
        config={**last.config, "window": windows, "stride": stride},
        details={**last.details, "windows": per_window}, samples=last.samples,
    )


def plot_windows(result: EvalResult, path) -> None:
    """A PNG of token perplexity and bits per byte against the window size (log2 axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.details["windows"]
    ws = [r["window"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
    for ax, key, label in ((axes[0], "token_perplexity", "token perplexity"), (axes[1], "bits_per_byte", "bits per byte")):
        ax.plot(ws, [r[key] for r in rows], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ws, [str(w) for w in ws])
        ax.set_xlabel("window (tokens of context)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    model = result.config.get("model") or ""
    fig.suptitle(f"perplexity over context windows {model}".strip())
    fig.savefig(path, dpi=120)
    plt.close(fig)
