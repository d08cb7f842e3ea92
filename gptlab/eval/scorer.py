"""Loglikelihood scoring shared by every task and by the lm-evaluation-harness adapter.

Requests are tokenised and scored exactly as the harness's `hf` model does (lm_eval 0.4:
`TemplateLM._encode_pair` / `.loglikelihood` in lm_eval/api/model.py, `HFLM.tok_encode` and
`HFLM._loglikelihood_tokens` in lm_eval/models/huggingface.py):

- text is encoded with the tokenizer's special tokens (its tokenizer.json post-processor, e.g. a BOS),
  unless it already starts with the prefix token's text;
- trailing spaces of a context move to the continuation, the pair is encoded as context + continuation
  and the continuation is whatever follows the context's own tokens;
- an empty context becomes the prefix token: the BOS if the tokenizer has one, else the EOS;
- context + continuation longer than the model's context + 1 lose tokens on the left;
- a request returns (sum of the continuation's log-probabilities, whether greedy decoding reproduces it).

It is faster than the harness (bench/bench_eval.py) without changing a number beyond float rounding:

- requests that share a context (the choices of a question, the labels of a classification prompt)
  prefill that context once into the KV cache, and every continuation is scored from the cached prefix;
- the output head and log-softmax run only at scored positions, not at every position (GPT-2's head is
  about a third of its forward FLOPs);
- requests are sorted by length so batches carry little padding, and identical requests run once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from gptlab.errors import GptlabError
from gptlab.limits import check
from gptlab.models.kvcache import DenseCache

Tokens = list[int]
HEAD_ROWS = 2048  # positions per output-head chunk (bounds the logits' memory, see Scorer._head)


class Scorer:
    """Scores continuations under a gptlab model; `batch_size` bounds the rows of every forward pass."""

    def __init__(self, model, tokenizer, batch_size: int = 16, context_length: int | None = None,
                 progress: bool = True) -> None:
        check("batch_size", batch_size)
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = batch_size
        self.context_length = context_length or model.config.context_length  # tokens a request may read
        if self.context_length > model.config.context_length:
            raise GptlabError(f"context length {self.context_length} exceeds the model's "
                              f"({model.config.context_length})")
        # HFLM.prefix_token_id: the BOS when the tokenizer has one, else the EOS
        self.prefix_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        self._prefix_text = tokenizer.decode([self.prefix_id]) if self.prefix_id is not None else None
        self.progress = progress
        self.tokens = 0  # tokens the model has read (padding excluded), for tokens/s
        self.seconds = 0.0  # time spent in forward passes and scoring

    @property
    def device(self) -> torch.device:
        return self.model.wte.weight.device

    # ---- text -> tokens, as HFLM does ----
    def encode(self, text: str) -> Tokens:
        """Token ids of `text` with the tokenizer's special tokens, unless it starts with the prefix token."""
        add = not (self._prefix_text and text.startswith(self._prefix_text))
        return self.tokenizer.encode(text, add_special_tokens=add)

    def encode_pair(self, context: str, continuation: str) -> tuple[Tokens, Tokens]:
        """(context ids, continuation ids) for one request (TemplateLM.loglikelihood / _encode_pair)."""
        if context == "":
            cont = self.tokenizer.encode(continuation, add_special_tokens=False)
            if not cont:
                raise GptlabError("empty continuation: nothing to score")
            if self.prefix_id is None:
                raise GptlabError("an empty context needs a BOS or EOS token, and the tokenizer has neither")
            return ([self.prefix_id], cont) if cont[0] != self.prefix_id else (cont[:1], cont[1:])
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], desc: str = "scoring") -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) for each (context, continuation) string pair."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in pairs], desc=desc)

    # ---- tokens -> scores ----
    @torch.inference_mode()
    def loglikelihood_tokens(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                             desc: str = "scoring") -> list[tuple[float, bool]]:
        """(sum of log-probs of the continuation, is_greedy) per (context ids, continuation ids) request."""
        from tqdm.auto import tqdm

        L = self.context_length
        # context (as the model will see it) -> continuation -> indices of the requests asking for it
        groups: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
        for i, (ctx, cont) in enumerate(requests):
            if not cont:
                raise GptlabError(f"request {i} has an empty continuation (nothing to score)")
            if not ctx:
                raise GptlabError(f"request {i} has an empty context; use encode_pair, which adds the prefix token")
            if len(cont) > L:
                raise GptlabError(f"request {i}: a continuation of {len(cont)} tokens exceeds the context of {L}")
            full = (list(ctx) + list(cont))[-(L + 1):]  # HFLM: truncate from the left
            key = tuple(full[: len(full) - len(cont)])
            groups.setdefault(key, {}).setdefault(tuple(cont), []).append(i)

        results: list[tuple[float, bool] | None] = [None] * len(requests)
        singles = [(ctx, next(iter(conts))) for ctx, conts in groups.items() if len(conts) == 1]
        shared = [(ctx, list(conts)) for ctx, conts in groups.items() if len(conts) > 1]
        bar = tqdm(total=len(requests), desc=desc, disable=not self.progress, leave=False)
        start = time.perf_counter()
        try:
            for batch in self._batches_single(singles):
                for (ctx, cont), score in zip(batch, self._score_single(batch)):
                    for i in groups[ctx][cont]:
                        results[i] = score
                    bar.update(len(groups[ctx][cont]))
            for batch in self._batches_shared(shared):
                scores = iter(self._score_shared(batch))
                for ctx, conts in batch:
                    for cont in conts:
                        score = next(scores)
                        for i in groups[ctx][cont]:
                            results[i] = score
                        bar.update(len(groups[ctx][cont]))
        finally:
            bar.close()
            self.seconds += time.perf_counter() - start
        return results  # type: ignore[return-value]

    def _batches_single(self, items):
        # longest first, as HFLM's Collator sorts: padding stays small and memory peaks at once
        items = sorted(items, key=lambda it: -(len(it[0]) + len(it[1])))
        for i in range(0, len(items), self.batch_size):
            yield items[i: i + self.batch_size]

    def _batches_shared(self, items):
        # up to batch_size contexts per prefill, similar context lengths together; their continuations are
        # then re-sorted by their own length for the second pass (_score_shared)
        items = sorted(items, key=lambda it: -len(it[0]))
        limit = self.model.config.context_length  # the cache holds the longest context + the longest continuation
        batch, longest = [], 0
        for ctx, conts in items:
            cont = max(map(len, conts))
            if batch and (len(batch) == self.batch_size or len(batch[0][0]) + max(longest, cont) - 1 > limit):
                yield batch
                batch, longest = [], 0
            batch.append((ctx, conts))
            longest = max(longest, cont)
        if batch:
            yield batch

    def _head(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-prob of each target and whether it is the argmax, from final hidden states (N, C).

        In chunks of HEAD_ROWS positions: a batch of 16 full GPT-2 windows would otherwise hold 16K x 50K
        fp32 logits (3.3 GB) twice over, which is what the harness's full-sequence log_softmax costs.
        """
        lps, greedy = [], []
        for h, t in zip(hidden.split(HEAD_ROWS), targets.split(HEAD_ROWS)):
            logits = self.model.lm_head(h).float()  # (n, V)
            lps.append(F.log_softmax(logits, dim=-1).gather(1, t[:, None]).squeeze(1))
            greedy.append(logits.argmax(dim=-1) == t)
        return torch.cat(lps), torch.cat(greedy)

    def _score_single(self, batch) -> list[tuple[float, bool]]:
        """One forward pass over context + continuation[:-1] per row (right-padded, no cache)."""
        inputs = [list(ctx) + list(cont[:-1]) for ctx, cont in batch]
        T = max(map(len, inputs))
        idx = torch.zeros(len(batch), T, dtype=torch.long)
        rows, cols, targets = [], [], []
        for r, ((ctx, cont), inp) in enumerate(zip(batch, inputs)):
            idx[r, : len(inp)] = torch.tensor(inp)
            rows += [r] * len(cont)
            cols += range(len(ctx) - 1, len(ctx) - 1 + len(cont))
            targets += cont
        self.tokens += sum(map(len, inputs))
        hidden = self.model(idx.to(self.device), return_hidden=True)  # (B, T, C)
        rows_t = torch.tensor(rows, device=self.device)
        lp, greedy = self._head(hidden[rows_t, torch.tensor(cols, device=self.device)],
                                torch.tensor(targets, device=self.device))
        return _per_request(lp, greedy, rows, len(batch))

    def _score_shared(self, batch) -> list[tuple[float, bool]]:
        """Prefill each context once (left-padded, KV cache), then score all its continuations from the cache.

        The context's last position predicts every continuation's first token. The remaining continuation
        tokens run in passes of batch_size rows, sorted by length (little padding), each row reading a copy
        of its context's cache rows.
        """
        model, device = self.model, self.device
        G = len(batch)
        Lc = max(len(ctx) for ctx, _ in batch)
        conts = [(g, cont) for g, (_, cs) in enumerate(batch) for cont in cs]
        Tk = max(len(c) for _, c in conts) - 1  # continuation tokens fed after the context, at most
        pad = torch.tensor([Lc - len(ctx) for ctx, _ in batch], device=device)
        idx = torch.tensor([[0] * (Lc - len(ctx)) + list(ctx) for ctx, _ in batch], device=device)  # (G, Lc)
        self.tokens += sum(len(ctx) for ctx, _ in batch)
        lp_total = torch.zeros(len(conts), dtype=torch.float64, device=device)
        misses = torch.zeros(len(conts), dtype=torch.long, device=device)  # non-greedy tokens per continuation
        prefix = DenseCache.for_model(model, G, Lc + Tk, starts=pad)  # left-padded rows start at their pad
        hidden = model(idx, cache=prefix, return_hidden=True)
        first = torch.tensor([g for g, _ in conts], device=device)
        lp0, greedy0 = self._head(hidden[first, -1], torch.tensor([c[0] for _, c in conts], device=device))
        lp_total += lp0.double()
        misses += (~greedy0).long()
        longer = sorted((j for j, (_, c) in enumerate(conts) if len(c) > 1), key=lambda j: -len(conts[j][1]))
        for start in range(0, len(longer), self.batch_size):
            chunk = longer[start: start + self.batch_size]
            group_rows = torch.tensor([conts[j][0] for j in chunk], device=device)
            cache = prefix.fork(group_rows)  # each row reads a copy of its context's keys and values
            T = len(conts[chunk[0]][1]) - 1  # the chunk's longest (sorted descending)
            idx2 = torch.zeros(len(chunk), T, dtype=torch.long)
            rows, cols, targets = [], [], []
            for r, j in enumerate(chunk):
                cont = conts[j][1]
                idx2[r, : len(cont) - 1] = torch.tensor(cont[:-1])
                rows += [r] * (len(cont) - 1)
                cols += range(len(cont) - 1)
                targets += cont[1:]
            self.tokens += len(targets)
            hidden2 = model(idx2.to(device), cache=cache, return_hidden=True)
            rows_t = torch.tensor(rows, device=device)
            lp, greedy = self._head(hidden2[rows_t, torch.tensor(cols, device=device)],
                                    torch.tensor(targets, device=device))
            owner = torch.tensor(chunk, device=device)[rows_t]
            lp_total.index_add_(0, owner, lp.double())
            misses.index_add_(0, owner, (~greedy).long())
        return [(float(t), m == 0) for t, m in zip(lp_total.tolist(), misses.tolist())]

    # ---- rolling windows (perplexity) ----
    def rolling_requests(self, tokens: Sequence[int], window: int | None = None,
                         stride: int | None = None) -> list[tuple[Tokens, Tokens]]:
        """Split a document into scoring requests that predict each of its tokens exactly once.

        The document is x = [prefix] + tokens (x_0 = BOS/EOS, so the first token is predicted too). Window k
        ends at e_k = min(W + k * S, N) and reads x[e_k - W : e_k], i.e. at most W tokens; it scores the
        tokens it predicts that no earlier window did, x[e_{k-1} + 1 .. e_k]. With stride S = W the windows
        are the harness's disjoint windows (`get_rolling_token_windows` with context_len=1 +
        `make_disjoint_window`): every token but the first of a window sees only its own window, and the last
        window is aligned to the end of the text. With S < W each scored token sees at least W - S earlier
        tokens (the sliding window of the GPT-2 paper and transformers' perplexity guide).
        """
        W = window or self.context_length
        S = stride or W
        if not 1 <= W <= self.context_length:
            raise GptlabError(f"window must be between 1 and the model's context ({self.context_length}), got {W}")
        if not 1 <= S <= W:
            raise GptlabError(f"stride must be between 1 and the window ({W}), got {S}")
        if not tokens:
            return []
        if self.prefix_id is None:
            raise GptlabError("rolling perplexity needs a BOS or EOS token to predict the first token from")
        x = [self.prefix_id] + list(tokens)
        N = len(tokens)
        out, prev, end = [], 0, min(W, N)
        while True:
            n = end - prev
            out.append((x[max(0, end - W): end - n + 1], x[end - n + 1: end + 1]))
            if end == N:
                return out
            prev, end = end, min(end + S, N)


def _per_request(lp: torch.Tensor, greedy: torch.Tensor, rows: list[int], n: int) -> list[tuple[float, bool]]:
    """Sum per-token log-probs (in float64) and AND the greedy flags into one result per row."""
    row_t = torch.tensor(rows, device=lp.device)
    total = torch.zeros(n, dtype=torch.float64, device=lp.device).index_add_(0, row_t, lp.double())
    misses = torch.zeros(n, dtype=torch.long, device=lp.device).index_add_(0, row_t, (~greedy).long())
    return [(float(t), m == 0) for t, m in zip(total.tolist(), misses.tolist())]
