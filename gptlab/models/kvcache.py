"""KV caches: objects passed to `GPT.forward(idx, cache=...)`, never attributes of the model's modules.

A cache does the attention of the new tokens: `attend(layer, q, k, v, scale)` stores the new keys and values
and returns the attention output over everything the cache holds for each row. Two kinds:

- `DenseCache` (here): every row's keys and values contiguous, rows advancing together (a static batch).
  Left-padded rows start later (`starts`), so positions and masks stay exact per row. The scorer uses it
  to prefill shared contexts once and score continuations from forks of it.
- the engine's paged cache (gptlab/infer/paged.py): fixed-size blocks from one pool, a block table per
  sequence, rows at different positions in one flattened batch.

Shapes: B rows, T new tokens, S slots, nh / nkv query / key-value heads, hs head size.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from gptlab.errors import GptlabError


class KVCache(Protocol):
    def positions(self, T: int) -> torch.Tensor: ...  # (B, T) positions of the next T tokens of each row

    def lengths(self, positions: torch.Tensor) -> torch.Tensor: ...  # (B|1, T|1) each token's sequence length

    def begin(self, T: int) -> None: ...  # before the first layer of a forward of T new tokens

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float | None) -> torch.Tensor: ...  # (B, nh, T, hs) attention output

    def end(self, T: int) -> None: ...  # after the last layer


def attention_bias(q_pos: torch.Tensor, S: int, window: int, dtype: torch.dtype,
                   starts: torch.Tensor | None = None) -> torch.Tensor:
    """Additive mask (B|1, 1, T, S) for queries at slots q_pos (T,): causal, within the window, and never onto
    a row's slots before its start (left padding).

    Built once per forward as 0 / -inf in the activations' dtype: SDPA on CPU would otherwise convert a
    boolean mask in every layer (measured several times slower for batch-1 decode).
    """
    q = q_pos[:, None]  # (T, 1)
    k = torch.arange(S, device=q_pos.device)[None, :]  # (1, S)
    allowed = k <= q
    if window:
        allowed = allowed & (q - k < window)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if starts is not None:
        allowed = allowed & (k >= starts[:, None, None, None])  # (B, 1, T, S)
        # a padding slot attends to itself, so its (unused) row stays finite instead of NaN
        allowed = allowed | (k == q)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


class DenseCache:
    """Keys and values of `batch` rows in `capacity` contiguous slots per layer; all rows advance together.

    starts (B,): the first slot each row uses (a left-padded row's earlier slots are never attended, and its
    positions count from its start). `fork(rows)` copies some rows into a new cache, so one prefilled context
    can be continued several ways.
    """

    def __init__(self, config, batch: int, capacity: int, dtype: torch.dtype, device: torch.device | str,
                 starts: torch.Tensor | None = None) -> None:
        if capacity > config.context_length:
            raise GptlabError(f"cache length {capacity} exceeds the model's context of {config.context_length}")
        shape = (batch, config.n_kv_head, capacity, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.windows = [config.window(i) for i in range(config.n_layer)]
        self.starts = starts if starts is not None and bool(starts.any()) else None
        self.filled = 0  # slots written so far, the same for every row
        self.capacity = capacity
        self._masks: dict[int, torch.Tensor | None] = {}
        self._T = 0

    @classmethod
    def for_model(cls, model, batch: int, capacity: int, starts: torch.Tensor | None = None) -> "DenseCache":
        w = model.wte.weight
        return cls(model.config, batch, capacity, w.dtype, w.device, starts)

    def positions(self, T: int) -> torch.Tensor:
        device = self.k[0].device
        pos = torch.arange(self.filled, self.filled + T, device=device)[None, :]  # (1, T)
        return pos if self.starts is None else (pos - self.starts[:, None]).clamp(min=0)  # (B, T)

    def lengths(self, positions: torch.Tensor) -> torch.Tensor:
        return positions.amax(-1, keepdim=True) + 1  # (B|1, 1): every row's tokens so far

    def begin(self, T: int) -> None:
        if self.filled + T > self.capacity:
            raise GptlabError(f"position {self.filled + T - 1} is past the KV cache length {self.capacity}")
        self._T, self._masks = T, {}

    def _mask(self, window: int, dtype: torch.dtype) -> torch.Tensor | None:
        S, T = self.filled + self._T, self._T
        if window not in self._masks:
            # no mask at all for the common cases: a whole causal sequence, or one new token seeing every key
            plain = self.starts is None and (T == 1 or T == S) and (window == 0 or window >= S)
            q_pos = torch.arange(self.filled, S, device=self.k[0].device)
            self._masks[window] = None if plain else attention_bias(q_pos, S, window, dtype, self.starts)
        return self._masks[window]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float | None) -> torch.Tensor:
        T, S = k.shape[2], self.filled + self._T
        self.k[layer][:, :, self.filled:S] = k
        self.v[layer][:, :, self.filled:S] = v
        mask = self._mask(self.windows[layer], q.dtype)
        keys, values = self.k[layer][:, :, :S].to(q.dtype), self.v[layer][:, :, :S].to(q.dtype)  # fp32 q: upcast
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=mask is None and T > 1,
            scale=scale, enable_gqa=q.shape[1] != k.shape[1],
        )  # (B, nh, T, hs)

    def end(self, T: int) -> None:
        self.filled += T

    def fork(self, rows: torch.Tensor) -> "DenseCache":
        """A new cache holding copies of `rows` of this one (the originals stay untouched)."""
        new = object.__new__(DenseCache)
        new.k = [k.index_select(0, rows) for k in self.k]
        new.v = [v.index_select(0, rows) for v in self.v]
        new.windows, new.filled, new.capacity = self.windows, self.filled, self.capacity
        new.starts = None if self.starts is None else self.starts.index_select(0, rows)
        new._masks, new._T = {}, 0
        return new
