"""The one decoder-only Transformer, GPT-1 to Qwen3-MoE.

Everything that differs between families is a field of `Config`; this file reads those fields and never
a model's name. Shapes: B batch, T new tokens, S cached length, C width, nh / nkv query / key-value heads,
hs head size, V vocab.

Inference follows gpt-fast: a static KV cache (`setup_cache`), prefill then one token per step, slots of
the cache addressed by `input_pos`. Batched prompts of different lengths are left-padded; `pad_lens`
tells each row how many leading slots are padding, so positions and masks stay exact per row.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab import kernels
from gptlab.errors import GptlabError
from gptlab.models.config import Config


# ---------------------------------------------------------------------------------------------------------
# pieces


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; without autograd on the CPU, the faster kernel for the shape (gptlab/kernels: decode GEMV)."""
    if not torch.is_grad_enabled():
        y = kernels.cpu_linear(x, weight, bias)  # None off the CPU or where no kernel beats F.linear
        if y is not None:
            return y
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose forward is `linear` above (same parameters, same state-dict names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back (as Qwen's reference does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(config: Config, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps)


ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's tanh approximation
    "gelu": F.gelu,  # exact erf form (GPT-NeoX)
    "relu": F.relu,
    "silu": F.silu,  # SwiGLU gate (Qwen)
}


def rope_cache(config: Config, length: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (length, rotary_dim), fp32 (RoFormer, eq. 34)."""
    rd = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, rd, 2, device=device, dtype=torch.int64).float() / rd))
    freqs = torch.outer(torch.arange(length, device=device, dtype=torch.int64).float(), inv_freq)  # (L, rd/2)
    if config.rotary_interleaved:
        emb = freqs.repeat_interleave(2, dim=-1)  # GPT-J: pairs (x0,x1),(x2,x3),...
    else:
        emb = torch.cat((freqs, freqs), dim=-1)  # NeoX / Qwen: halves
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the first rotary_dim channels of x (B, nh, T, hs) by cos/sin (B|1, 1, T, rd)."""
    rd = cos.shape[-1]
    xr, xp = x[..., :rd], x[..., rd:]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    out = xr * cos + rotated * sin
    return torch.cat((out, xp), dim=-1) if xp.shape[-1] else out


class KVCache(nn.Module):
    """Static cache for one layer: (B, nkv, S, hs) keys and values, written at slots `input_pos`."""

    def __init__(self, batch_size: int, n_kv_head: int, length: int, head_dim: int, dtype, device) -> None:
        super().__init__()
        shape = (batch_size, n_kv_head, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, config: Config, layer: int) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # q, k and v in one matmul, rows ordered [q; k; v] (gptlab/formats/families split / join each family's layout)
        self.qkv = Linear(config.n_embd, config.qkv_dim, bias=config.qkv_bias)
        self.proj = Linear(config.n_head * config.head_dim, config.n_embd, bias=config.attn_out_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.qk_norm = config.qk_norm
        self.interleaved = config.rotary_interleaved
        self.scale = None if config.scale_attn else 1.0  # None: SDPA's 1/sqrt(hs)
        self.window = config.window(layer)
        self.dropout = config.dropout
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, input_pos, kv_len):
        """mask None: causal over the first kv_len keys (T == kv_len), or all of them (T == 1)."""
        B, T, _ = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split((nh * hs, nkv * hs, nkv * hs), dim=-1)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:
            q = apply_rope(q, cos, sin, self.interleaved)
            k = apply_rope(k, cos, sin, self.interleaved)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
            k, v = k[:, :, :kv_len], v[:, :, :kv_len]  # (B, nkv, S, hs): only the slots written so far
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=nkv != nh,
        )  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, nh * hs))


class MLP(nn.Module):
    """Feed-forward: act(fc(x)) for GPT-style, act(gate(x)) * up(x) for GLU (fc rows are [gate; up])."""

    def __init__(self, config: Config, hidden: int) -> None:
        super().__init__()
        self.glu = config.mlp != "mlp"
        self.fc = Linear(config.n_embd, 2 * hidden if self.glu else hidden, bias=config.mlp_bias)
        self.proj = Linear(hidden, config.n_embd, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.glu:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.proj(h)


class MoE(nn.Module):
    """Top-k routed SwiGLU experts (Qwen2-MoE / Qwen3-MoE), optionally with a gated shared expert.

    Expert weights are stacked: gate_up (E, 2I, C) with rows [gate; up], down (E, C, I).
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        E, I, C = config.n_expert, config.moe_intermediate_size, config.n_embd
        self.top_k, self.norm_topk_prob = config.n_expert_per_token, config.norm_topk_prob
        self.router = Linear(C, E, bias=False)
        self.gate_up = nn.Parameter(torch.empty(E, 2 * I, C))
        self.down = nn.Parameter(torch.empty(E, C, I))
        self.act = ACTIVATIONS[config.activation]
        self.shared = None
        if config.shared_expert_intermediate_size:
            self.shared = MLP(config, config.shared_expert_intermediate_size)
            self.shared_gate = Linear(C, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x = x.reshape(-1, C)  # (N, C)
        probs = F.softmax(self.router(x), dim=-1, dtype=torch.float)  # (N, E)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e in experts.unique().tolist():
            token, slot = torch.where(experts == e)
            gate, up = linear(x[token], self.gate_up[e]).chunk(2, dim=-1)
            h = linear(self.act(gate) * up, self.down[e]) * weights[token, slot, None]
            out.index_add_(0, token, h)
        if self.shared is not None:
            out = out + torch.sigmoid(self.shared_gate(x)) * self.shared(x)
        return out.view(B, T, C)


class Block(nn.Module):
    def __init__(self, config: Config, layer: int) -> None:
        super().__init__()
        self.post_norm, self.parallel = config.post_norm, config.parallel_residual
        self.norm_1 = make_norm(config, config.n_embd)
        self.attn = Attention(config, layer)
        self.norm_2 = None if config.shared_norm else make_norm(config, config.n_embd)
        self.mlp = MoE(config) if config.is_moe_layer(layer) else MLP(config, config.intermediate_size)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, mask, input_pos, kv_len):
        if self.post_norm:  # GPT-1
            x = self.norm_1(x + self.drop(self.attn(x, cos, sin, mask, input_pos, kv_len)))
            return self.norm_2(x + self.drop(self.mlp(x)))
        h = self.norm_1(x)
        a = self.drop(self.attn(h, cos, sin, mask, input_pos, kv_len))
        if self.parallel:  # GPT-J (shared norm) and GPT-NeoX
            m = self.mlp(h if self.norm_2 is None else self.norm_2(x))
            return x + a + self.drop(m)
        x = x + a
        return x + self.drop(self.mlp(self.norm_2(x)))


# ---------------------------------------------------------------------------------------------------------
# the model


class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        # _weight skips nn.Embedding's own init (redone by _init_weights; on the meta device it costs seconds)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd, _weight=torch.empty(config.vocab_size, config.n_embd))
        self.wpe = None
        if config.positions == "learned":
            self.wpe = nn.Embedding(config.context_length, config.n_embd, _weight=torch.empty(config.context_length, config.n_embd))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = make_norm(config, config.n_embd) if config.final_norm else nn.Identity()
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=config.lm_head_bias)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.init_buffers()
        if self.wte.weight.device.type != "meta":
            self.apply(self._init_weights)
            self._init_scaled_projections()

    # ---- construction ----
    def init_buffers(self, device: torch.device | None = None) -> None:
        """(Re)compute the rotary tables; call after `to_empty` from the meta device."""
        if self.config.positions == "rotary":
            cos, sin = rope_cache(self.config, self.config.context_length, device=device)
        else:
            cos = sin = torch.empty(0, device=device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, MoE):
            nn.init.normal_(module.gate_up, mean=0.0, std=std)
            nn.init.normal_(module.down, mean=0.0, std=std)

    def _init_scaled_projections(self) -> None:
        # GPT-2 paper, sec. 2.3: scale residual-branch output weights by 1/sqrt(number of residual layers)
        std = self.config.init_std / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=std)
            if isinstance(block.mlp, MLP):
                nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=std)

    # ---- KV cache ----
    def setup_cache(self, batch_size: int, length: int, dtype: torch.dtype | None = None, device=None) -> None:
        """Allocate a static KV cache of `length` slots per layer for `batch_size` rows."""
        if length > self.config.context_length:
            raise GptlabError(f"cache length {length} exceeds the model's context of {self.config.context_length}")
        p = self.wte.weight
        c = self.config
        for block in self.blocks:
            block.attn.kv_cache = KVCache(batch_size, c.n_kv_head, length, c.head_dim, dtype or p.dtype, device or p.device)

    def clear_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None

    @property
    def cache_length(self) -> int:
        cache = self.blocks[0].attn.kv_cache
        return 0 if cache is None else cache.k.shape[2]

    # ---- forward ----
    def forward(
        self,
        idx: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        pad_lens: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, V), or final hidden states (B, T, C) with return_hidden.

        input_pos (T,): the cache slots these tokens occupy (needs `setup_cache`); None: slots 0..T-1, no
        cache. pad_lens (B,): leading padding slots per row (left-padded batches).
        """
        B, T = idx.shape
        cached = self.cache_length > 0
        if input_pos is None:
            if cached:
                raise GptlabError("the KV cache is set up: pass input_pos (or call clear_cache)")
            if T > self.config.context_length:
                raise GptlabError(f"sequence of {T} tokens exceeds the model's context of {self.config.context_length}")
            input_pos = torch.arange(T, device=idx.device)
        kv_len = T
        if cached:
            kv_len = int(input_pos[-1]) + 1  # slots are filled in order; attend to those written so far
            if kv_len > self.cache_length:
                raise GptlabError(f"position {kv_len - 1} is past the KV cache length {self.cache_length}")
        pos = input_pos[None, :]  # (1, T)
        if pad_lens is not None:
            pos = (pos - pad_lens[:, None]).clamp(min=0)  # (B, T)

        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(pos)
        x = self.drop(x)
        cos = sin = None
        if self.config.positions == "rotary":
            cos = self.rope_cos[pos].unsqueeze(1).to(x.dtype)  # (B|1, 1, T, rd)
            sin = self.rope_sin[pos].unsqueeze(1).to(x.dtype)

        # no mask at all for the common cases: a full causal sequence, or one new token seeing every key
        plain = pad_lens is None and (T == 1 or T == kv_len)
        masks: dict[int, torch.Tensor | None] = {}
        for block in self.blocks:
            w = block.attn.window
            if w not in masks:
                masks[w] = None if plain and (w == 0 or w >= kv_len) else self._mask(input_pos, kv_len, pad_lens, w, x.dtype)
            x = block(x, cos, sin, masks[w], input_pos if cached else None, kv_len)
        x = self.norm_f(x)
        return x if return_hidden else self.lm_head(x)

    @staticmethod
    def _mask(input_pos: torch.Tensor, S: int, pad_lens: torch.Tensor | None, window: int, dtype) -> torch.Tensor:
        """Additive attention mask (B|1, 1, T, S): causal, within the window, and never onto padding.

        Built once per forward as 0 / -inf in the activations' dtype: SDPA on CPU would otherwise convert a
        boolean mask in every layer (measured several times slower for batch-1 decode).
        """
        q = input_pos[:, None]  # (T, 1)
        k = torch.arange(S, device=input_pos.device)[None, :]  # (1, S)
        allowed = k <= q
        if window:
            allowed = allowed & (q - k < window)
        allowed = allowed[None, None]  # (1, 1, T, S)
        if pad_lens is not None:
            allowed = allowed & (k >= pad_lens[:, None, None, None])  # (B, 1, T, S)
            # a padding slot attends to itself, so its (unused) row stays finite instead of NaN
            allowed = allowed | (k == q)
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))

    # ---- convenience ----
    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return n
