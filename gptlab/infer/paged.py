"""The engine's paged KV cache: one pool of fixed-size blocks per layer, and for each forward pass the map
from its flattened tokens to the pool (a KVCache for `GPT.forward`, gptlab/models/kvcache.py).

An engine step runs every scheduled sequence's new tokens as one flattened row, (1, N): the linear layers
see all N tokens at once, whatever mix of prompt chunks and single decode tokens they are. Attention is per
sequence: a token at position p of a sequence writes its key and value to slot block_table[p // bs] * bs +
p % bs and attends to that sequence's slots 0..p (within the layer's local window, if any). Decode tokens
(one per sequence) are attended to in one batched call; each prompt chunk in its own.

Shapes: N new tokens, R decode rows, L cached length, nh / nkv query / key-value heads, hs head size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gptlab import kernels
from gptlab.models.kvcache import attention_bias


@dataclass
class Segment:
    """One sequence's tokens in a step: `length` new tokens after `context` cached ones."""

    start: int  # offset in the flattened batch
    length: int
    context: int
    block_table: list[int]


class PagedCache:
    def __init__(self, config, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        nkv, hs = config.n_kv_head, config.head_dim
        # keys in pairs of dimensions, key after key, within each block: (blocks, nkv, ceil(hs / 2), bs, 2), so the
        # decode kernel scores a block's keys with whole-vector multiply-adds (gptlab/kernels/attention.c); values
        # one row per key: (blocks, bs, nkv, hs)
        self.head_dim, self.pairs = hs, -(-hs // 2)
        self.k = [torch.zeros(num_blocks, nkv, self.pairs, block_size, 2, dtype=dtype, device=device)
                  for _ in range(config.n_layer)]
        self.v = [torch.zeros(num_blocks, block_size, nkv, hs, dtype=dtype, device=device)
                  for _ in range(config.n_layer)]
        self.windows = [config.window(i) for i in range(config.n_layer)]
        self.block_size, self.num_blocks, self.device = block_size, num_blocks, torch.device(device)

    @staticmethod
    def bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
        return 2 * config.n_layer * block_size * config.n_kv_head * config.head_dim * dtype.itemsize

    # ---- one step ----
    def prepare(self, segments: list[Segment]) -> torch.Tensor:
        """Set the step's token -> slot map and attention groups; return the tokens' positions (1, N)."""
        bs, dev = self.block_size, self.device
        pos, slots = [], []
        for s in segments:
            p = list(range(s.context, s.context + s.length))
            pos += p
            slots += [s.block_table[i // bs] * bs + i % bs for i in p]
        self.n = len(pos)
        self.slots = torch.tensor(slots, dtype=torch.long, device=dev)
        self._slot_index = None  # (blocks, offsets) of the slots, for _store_keys: decode-only steps never ask
        self._segments = segments
        decode = [s for s in segments if s.length == 1]
        self.prefill = [s for s in segments if s.length > 1]
        self.decode_rows = None
        if decode:
            width = max(len(s.block_table) for s in decode)
            self.decode_rows = torch.tensor([s.start for s in decode], device=dev)  # (R,)
            self.decode_tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in decode],
                                              device=dev)  # (R, blocks); padding points at block 0, masked off
            self.decode_pos = torch.tensor([s.context for s in decode], device=dev)  # (R,)
            self.decode_last = self.decode_pos + 1  # (R,): each row attends to keys before this position
            self.decode_len = max(s.context for s in decode) + 1  # keys the longest decode row reads
            self._first: dict[int, torch.Tensor] = {}  # per window: each decode row's first visible key
        self._masks: dict[int, torch.Tensor] = {}
        return torch.tensor(pos, dtype=torch.long, device=dev)[None, :]

    def positions(self, T: int) -> torch.Tensor:
        raise RuntimeError("the engine passes positions from prepare()")

    def lengths(self, positions: torch.Tensor) -> torch.Tensor:
        lengths = [s.context + s.length for s in self._segments for _ in range(s.length)]
        return torch.tensor(lengths, dtype=torch.long, device=self.device)[None, :]  # (1, N): each token's
        # sequence length after this step (only dynamic NTK asks, so engine steps of other models skip it)

    def begin(self, T: int) -> None:
        assert T == self.n, "a paged forward runs exactly the prepared tokens"

    def end(self, T: int) -> None:
        pass

    def _gather(self, pool: torch.Tensor, tables: torch.Tensor, length: int) -> torch.Tensor:
        """The first `length` slots of each row's blocks of the V pool: (rows, nkv, length, hs)."""
        g = pool[tables]  # (rows, blocks, bs, nkv, hs)
        g = g.flatten(1, 2)[:, :length]  # (rows, L, nkv, hs)
        return g.transpose(1, 2)

    def _gather_keys(self, pool: torch.Tensor, tables: torch.Tensor, length: int) -> torch.Tensor:
        """The same from the K pool, whose blocks hold their keys in pairs: (rows, nkv, length, hs)."""
        g = pool[tables].permute(0, 2, 1, 4, 3, 5)  # (rows, nkv, blocks, bs, pairs, 2)
        return g.flatten(4, 5)[..., :self.head_dim].flatten(2, 3)[:, :, :length]

    def _store_keys(self, pool: torch.Tensor, k: torch.Tensor) -> None:
        """k (N, nkv, hs): the step's new keys, into their slots of the K pool (in pairs of dimensions)."""
        if k.shape[-1] != 2 * self.pairs:
            k = F.pad(k, (0, 1))  # an odd head size: a zero completes the last pair
        if self._slot_index is None:
            self._slot_index = (self.slots // self.block_size, self.slots % self.block_size)
        pool.permute(0, 3, 1, 2, 4)[self._slot_index] = k.unflatten(-1, (self.pairs, 2))

    def _first_keys(self, window: int) -> torch.Tensor:
        """(R,): each decode row's first visible key under a local window (0 without one)."""
        if window not in self._first:
            self._first[window] = (self.decode_pos - window + 1).clamp(min=0) if window else \
                torch.zeros_like(self.decode_pos)
        return self._first[window]

    def _decode_mask(self, window: int, L: int, dtype: torch.dtype) -> torch.Tensor:
        if window not in self._masks:
            k = torch.arange(L, device=self.device)[None, :]  # (1, L)
            q = self.decode_pos[:, None]  # (R, 1)
            allowed = k <= q
            if window:
                allowed = allowed & (q - k < window)
            mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device).masked_fill_(~allowed, float("-inf"))
            self._masks[window] = mask[:, None, None, :]  # (R, 1, 1, L)
        return self._masks[window]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float | None) -> torch.Tensor:
        nh, nkv = q.shape[1], k.shape[1]
        kp, vp = self.k[layer], self.v[layer]
        window = self.windows[layer]
        if not self.prefill:  # the steady state, one token per sequence in order: store and attend in one call
            out = kernels.paged_store_decode(q, k, v, self.slots, kp, vp, self.decode_tables, self._first_keys(window),
                                             self.decode_last, scale if scale is not None else q.shape[-1] ** -0.5)
            if out is not None:
                return out.transpose(0, 1)[None]  # (1, nh, R, hs)
        self._store_keys(kp, k[0].transpose(0, 1).to(kp.dtype))  # (N, nkv, hs)
        flat = vp.shape[0] * vp.shape[1]
        vp.view(flat, *vp.shape[2:]).index_copy_(0, self.slots, v[0].transpose(0, 1).to(vp.dtype))
        gqa = nh != nkv
        only_decode = not self.prefill  # the steady state: one token per sequence, in order
        y = None if only_decode else torch.empty_like(q)  # (1, nh, N, hs)
        if self.decode_rows is not None:
            qd = q[0].transpose(0, 1) if only_decode else q[0, :, self.decode_rows].transpose(0, 1)  # (R, nh, hs)
            # in place from the pool where the kernel runs (fp32 or bf16 on x86 CPUs); else gathered, then SDPA
            out = kernels.paged_decode(qd, kp, vp, self.decode_tables, self._first_keys(window), self.decode_last,
                                       scale if scale is not None else qd.shape[-1] ** -0.5)
            if out is None:
                L = self.decode_len
                keys = self._gather_keys(kp, self.decode_tables, L).to(q.dtype)  # (R, nkv, L, hs); fp32 q: upcast
                values = self._gather(vp, self.decode_tables, L).to(q.dtype)
                out = F.scaled_dot_product_attention(qd[:, :, None], keys, values, scale=scale, enable_gqa=gqa,
                                                     attn_mask=self._decode_mask(window, L, q.dtype))[:, :, 0]
            if only_decode:
                return out.transpose(0, 1)[None]  # (1, nh, R, hs)
            y[0, :, self.decode_rows] = out.transpose(0, 1)
        for s in self.prefill:
            L = s.context + s.length
            table = torch.tensor(s.block_table[: -(-L // self.block_size)], device=self.device)[None]
            keys = self._gather_keys(kp, table, L).to(q.dtype)  # (1, nkv, L, hs)
            values = self._gather(vp, table, L).to(q.dtype)
            qs = q[:, :, s.start:s.start + s.length]
            plain = s.context == 0 and (window == 0 or window >= L)
            mask = None if plain else attention_bias(torch.arange(s.context, L, device=self.device), L, window, q.dtype)
            y[:, :, s.start:s.start + s.length] = F.scaled_dot_product_attention(
                qs, keys, values, attn_mask=mask, is_causal=plain, scale=scale, enable_gqa=gqa)
        return y

