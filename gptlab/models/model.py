"""The one decoder-only Transformer, GPT-1 to Qwen3-MoE.

Everything that differs between families is a field of `Config`; this file reads those fields and never
a model's name. Shapes: B batch, T new tokens, S cached length, C width, nh / nkv query / key-value heads,
hs head size, V vocab.

Inference passes a KV cache object to `forward` (gptlab/models/kvcache.py: a dense per-row cache; the
engine's paged cache in gptlab/infer/paged.py) with each token's position; the cache stores the new keys and
values and does the attention over what it holds, so rows of one batch can be at different positions. The
modules hold no cache state.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab import kernels
from gptlab.errors import GptlabError
from gptlab.models.config import Config
from gptlab.models.kvcache import KVCache, attention_bias


# ---------------------------------------------------------------------------------------------------------
# pieces


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; without autograd on the CPU, the faster kernel for the shape (gptlab/kernels: decode GEMV).
    Under torch.compile always F.linear: the compiler fuses it, and a ctypes call would break its graph."""
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
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
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # the same formula, one fused kernel
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
    "relu2": lambda x: F.relu(x).square(),  # ReLU squared (Primer; the modded-nanogpt speedrun)
}


def _rope_exponents(config: Config, device=None) -> torch.Tensor:
    rd = config.rotary_dim
    return torch.arange(0, rd, 2, device=device, dtype=torch.int64).float() / rd  # (rd/2,)


def rope_frequencies(config: Config, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies (rd/2,) fp32 of each rotated pair: theta^(-2i/rd) (RoFormer, eq. 15), scaled.

    linear: divided by the factor (position interpolation, Chen et al. 2023). yarn: "NTK-by-parts" (Peng et al.
    2023, sec. 3.2): dims that turn fewer than beta_slow times over the original context are interpolated,
    those that turn more than beta_fast times keep their frequency, with a linear ramp between. dynamic: the
    original frequencies; `dynamic_rope` raises the base for sequences past the original context.
    """
    exps = _rope_exponents(config, device)
    inv = 1.0 / (config.rope_theta ** exps)
    if config.rope_scaling == "linear":
        inv = inv / config.rope_factor
    elif config.rope_scaling == "yarn":
        rd, theta = config.rotary_dim, config.rope_theta

        def dim_turning(turns: float) -> float:  # the (fractional) dim whose pair turns `turns` times
            return rd * math.log(config.rope_original / (turns * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dim_turning(config.rope_beta_fast), dim_turning(config.rope_beta_slow)
        if config.rope_truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rd - 1)
        high = high + 0.001 if low == high else high
        ramp = ((torch.arange(rd // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        kept = 1 - ramp  # share of the original (extrapolated) frequency
        wavelengths = theta ** exps
        inv = 1.0 / (config.rope_factor * wavelengths) * ramp + 1.0 / wavelengths * kept
    return inv


def _cos_sin(config: Config, angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if config.rotary_interleaved:
        emb = angles.repeat_interleave(2, dim=-1)  # GPT-J: pairs (x0,x1),(x2,x3),...
    else:
        emb = torch.cat((angles, angles), dim=-1)  # NeoX / Qwen: halves
    scale = config.rope_attention_factor if config.rope_scaling == "yarn" else 1.0
    return emb.cos() * scale, emb.sin() * scale


def rope_cache(config: Config, length: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (length, rotary_dim), fp32 (RoFormer, eq. 34)."""
    positions = torch.arange(length, device=device, dtype=torch.int64).float()
    return _cos_sin(config, torch.outer(positions, rope_frequencies(config, device)))  # angles (L, rd/2)


def dynamic_rope(config: Config, positions: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B|1, T, rd) under dynamic NTK scaling, each token by its sequence's length L (B|1, T|1):
    past the original context the base becomes theta * (factor L / original - (factor - 1))^(rd / (rd - 2)),
    as transformers computes it; up to it, the original frequencies."""
    rd, f, orig = config.rotary_dim, config.rope_factor, config.rope_original
    grown = lengths.float().clamp(min=orig)
    base = config.rope_theta * ((f * grown / orig) - (f - 1)) ** (rd / (rd - 2))  # (B|1, T|1)
    inv = 1.0 / (base[..., None] ** _rope_exponents(config, positions.device))  # (B|1, T|1, rd/2)
    return _cos_sin(config, positions[..., None].float() * inv)


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
        if config.scale_attn_by_layer:  # GPT-2's scale_attn_by_inverse_layer_idx
            self.scale = (self.head_dim ** -0.5 if config.scale_attn else 1.0) / (layer + 1)
        self.upcast = config.upcast_attn
        self.layer, self.window = layer, config.window(layer)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, mask, cache):
        """Without a cache: causal attention over these T tokens (mask: the local window, else None)."""
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
        if self.upcast and q.dtype != torch.float32:  # GPT-2's reorder_and_upcast_attn: scores and softmax in fp32
            q, k, v = q.float(), k.float(), v.float()
        if cache is not None:
            y = cache.attend(self.layer, q, k, v, self.scale)  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, scale=self.scale,
                dropout_p=self.dropout if self.training else 0.0, enable_gqa=nkv != nh,
            )  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, nh * hs).to(x.dtype))


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

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x) if self.training else x  # the identity in eval: skip the call (decode runs this per layer)

    def forward(self, x, cos, sin, mask, cache):
        if self.post_norm:  # GPT-1
            x = self.norm_1(x + self._drop(self.attn(x, cos, sin, mask, cache)))
            return self.norm_2(x + self._drop(self.mlp(x)))
        h = self.norm_1(x)
        a = self._drop(self.attn(h, cos, sin, mask, cache))
        if self.parallel:  # GPT-J (shared norm) and GPT-NeoX
            m = self.mlp(h if self.norm_2 is None else self.norm_2(x))
            return x + a + self._drop(m)
        x = x + a
        return x + self._drop(self.mlp(self.norm_2(x)))


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
        # (zero_init_proj: every block starts as the identity, as in the modded-nanogpt speedrun)
        std = self.config.init_std / math.sqrt(2 * self.config.n_layer)
        init = nn.init.zeros_ if self.config.zero_init_proj else (lambda w: nn.init.normal_(w, mean=0.0, std=std))
        for block in self.blocks:
            init(block.attn.proj.weight)
            if isinstance(block.mlp, MLP):
                init(block.mlp.proj.weight)

    # ---- forward ----
    def forward(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, V), or final hidden states (B, T, C) with return_hidden.

        positions (B|1, T): each token's position (rotary / learned embeddings); default: the cache's next
        positions, or 0..T-1 without one. cache: a KV cache (gptlab.models.kvcache) that stores these tokens'
        keys and values and attends over all it holds; None: causal attention over these T tokens alone.
        """
        B, T = idx.shape
        if positions is None:
            if cache is not None:
                positions = cache.positions(T)
            elif T > self.config.context_length:
                raise GptlabError(f"sequence of {T} tokens exceeds the model's context of {self.config.context_length}")
            else:
                positions = torch.arange(T, device=idx.device)[None, :]  # (1, T)
        if cache is not None and T and int(positions.max()) >= self.config.context_length:
            raise GptlabError(f"position {int(positions.max())} is past the model's context of "
                              f"{self.config.context_length}")

        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        x = self.drop(x) if self.training else x
        cos = sin = None
        if self.config.positions == "rotary":
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B|1, T, rd)
            if self.config.rope_scaling == "dynamic":
                cos, sin = self._dynamic_rope(positions, cache, cos, sin)
            cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)  # (B|1, 1, T, rd)

        masks: dict[int, torch.Tensor | None] = {}  # without a cache: one local-window mask per window size
        if cache is not None:
            cache.begin(T)
        for block in self.blocks:
            w = block.attn.window
            if cache is None and w not in masks:
                masks[w] = attention_bias(torch.arange(T, device=idx.device), T, w, x.dtype) if 0 < w < T else None
            x = block(x, cos, sin, masks.get(w), cache)
        if cache is not None:
            cache.end(T)
        x = self.norm_f(x)
        return x if return_hidden else self.lm_head(x)

    def _dynamic_rope(self, positions, cache, cos, sin):
        """Dynamic NTK: tokens of sequences longer than the original context get frequencies for their
        sequence's length (a sequence = a row; in the engine's flattened batch, each sequence's tokens)."""
        lengths = cache.lengths(positions) if cache is not None else positions.amax(-1, keepdim=True) + 1
        grown = lengths > self.config.rope_original  # (B|1, T|1)
        if not bool(grown.any()):
            return cos, sin
        dcos, dsin = dynamic_rope(self.config, positions, lengths)
        return torch.where(grown[..., None], dcos, cos), torch.where(grown[..., None], dsin, sin)

    def resize_vocab(self, vocab_size: int) -> None:
        """Grow the embedding (and an untied head) to `vocab_size` rows for tokens added to the tokenizer:
        existing rows kept, new ones initialised as at construction."""
        old = self.config.vocab_size
        if vocab_size <= old:
            return
        w = self.wte.weight
        with torch.no_grad():
            rows = torch.empty(vocab_size - old, w.shape[1], dtype=w.dtype, device=w.device)
            nn.init.normal_(rows, std=self.config.init_std)
            self.wte = nn.Embedding(vocab_size, w.shape[1], _weight=torch.cat([w.detach(), rows]))
            if self.config.tie_embeddings:
                head_w = self.wte.weight
            else:
                hw = self.lm_head.weight
                head_w = nn.Parameter(torch.cat([hw.detach(), torch.zeros(vocab_size - old, hw.shape[1], dtype=hw.dtype,
                                                                          device=hw.device)]))
            bias = self.lm_head.bias
            self.lm_head = Linear(w.shape[1], vocab_size, bias=bias is not None, device=w.device, dtype=w.dtype)
            self.lm_head.weight = head_w
            if bias is not None:
                self.lm_head.bias = nn.Parameter(torch.cat([bias.detach(), torch.zeros(vocab_size - old, dtype=bias.dtype,
                                                                                      device=bias.device)]))
        self.config.vocab_size = vocab_size

    # ---- convenience ----
    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return n
