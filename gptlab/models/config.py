"""One typed Config for every model of the GPT and Qwen lines.

Families differ only by the fields below (norm kind, MLP kind, parallel residual, kv heads, qk-norm,
biases, rotary fraction and style, local windows, experts); `model.py` reads nothing else. Derived fields
are filled in `__post_init__`, and a Config round-trips through JSON (`to_dict` / `from_dict`).
The table of named presets lives in `presets.py`; how each HF family spells these fields in its
config.json lives in `gptlab/formats/families/`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from gptlab.errors import GptlabError

Norm = Literal["layernorm", "rmsnorm"]
MLPKind = Literal["mlp", "glu", "moe"]
Activation = Literal["gelu_new", "gelu", "relu", "silu", "relu2"]
Positions = Literal["learned", "rotary"]
RopeScaling = Literal["default", "linear", "dynamic", "yarn"]


@dataclass
class Config:
    RENAMED: ClassVar[dict[str, str]] = {"block_size": "context_length"}  # nanoGPT's name, read as ours

    name: str = "custom"
    hf_repo: str | None = None  # the Hugging Face repo this preset corresponds to, when one exists
    model_type: str = "gpt2"  # HF `model_type`; picks the weight-name map used to load and save

    # sizes
    vocab_size: int = 50257
    context_length: int = 1024  # tokens the model attends over (HF n_positions / max_position_embeddings)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None  # grouped-query attention; None -> n_head (MHA), 1 -> MQA
    head_dim: int | None = None  # None -> n_embd // n_head (Qwen3 sets it independently)
    intermediate_size: int | None = None  # None -> 4 * n_embd

    # block layout
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    post_norm: bool = False  # GPT-1: x = norm(x + f(x)) instead of x + f(norm(x))
    final_norm: bool = True  # GPT-1 has no final norm
    parallel_residual: bool = False  # GPT-J / NeoX: x + attn(norm1(x)) + mlp(norm2(x))
    shared_norm: bool = False  # GPT-J: one norm feeds both branches of the parallel block

    # attention
    qkv_bias: bool = True
    attn_out_bias: bool = True
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before rotary
    scale_attn: bool = True  # GPT-Neo does not divide scores by sqrt(head_dim)
    scale_attn_by_layer: bool = False  # GPT-2 (Stanford CRFM): scores also divided by the layer index + 1
    upcast_attn: bool = False  # GPT-2 reorder_and_upcast_attn: attention in fp32 whatever the weights' dtype
    # per-layer local attention window in tokens, 0 = global (GPT-3's dense/local pattern, GPT-Neo,
    # Qwen sliding window); empty = every layer global
    layer_windows: list[int] = field(default_factory=list)

    # positions
    positions: Positions = "learned"
    rotary_fraction: float = 1.0  # share of each head's dims that rotate (Pythia 0.25, GPT-J 64/256)
    rotary_interleaved: bool = False  # GPT-J rotates pairs (x0,x1),(x2,x3)..; NeoX/Qwen rotate halves
    rope_theta: float = 10000.0
    # rotary scaling for contexts past the pretraining one: "linear" divides positions by rope_factor;
    # "dynamic" (NTK-aware) raises the base once a sequence passes rope_original_context; "yarn" blends
    # interpolated and extrapolated frequencies per dim (ramp between beta_fast and beta_slow rotations) and
    # scales cos/sin by rope_attention_factor. context_length is the extended context.
    rope_scaling: RopeScaling = "default"
    rope_factor: float = 1.0
    rope_original_context: int = 0  # the pretraining context the scaling extends (0: context / factor)
    rope_attention_factor: float = 1.0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = True  # yarn: round the ramp's ends to whole dims (transformers' default)

    # MLP
    mlp: MLPKind = "mlp"
    activation: Activation = "gelu_new"
    mlp_bias: bool = True

    # mixture of experts (mlp == "moe")
    n_expert: int = 0
    n_expert_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalise the top-k routing weights to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: an always-on expert with a sigmoid gate
    dense_layers: list[int] = field(default_factory=list)  # layers that use a dense MLP instead

    # output head
    tie_embeddings: bool = True
    lm_head_bias: bool = False  # GPT-J

    # training
    dropout: float = 0.0  # embedding, attention and residual dropout
    init_std: float = 0.02
    zero_init_proj: bool = False  # residual projections start at zero (the speedrun's init), not GPT-2's scaled normal

    # special tokens (kept for generation and saving)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise GptlabError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; set head_dim")
            self.head_dim = self.n_embd // self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        if self.n_head % self.n_kv_head:
            raise GptlabError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.layer_windows and len(self.layer_windows) != self.n_layer:
            raise GptlabError(f"layer_windows has {len(self.layer_windows)} entries for {self.n_layer} layers")
        if self.mlp == "moe" and not (0 < self.n_expert_per_token <= self.n_expert):
            raise GptlabError("a mixture-of-experts config needs 0 < n_expert_per_token <= n_expert")
        if self.positions == "rotary" and self.rotary_dim % 2:
            raise GptlabError(f"rotary_fraction={self.rotary_fraction} gives an odd rotary dim {self.rotary_dim}")
        if self.rope_scaling != "default":
            if self.positions != "rotary":
                raise GptlabError(f"rope_scaling={self.rope_scaling!r} needs rotary positions")
            if not self.rope_factor >= 1.0:
                raise GptlabError(f"rope_factor must be >= 1 for rope_scaling={self.rope_scaling!r}, got {self.rope_factor}")
            if not self.rope_original_context:
                self.rope_original_context = round(self.context_length / self.rope_factor)
        for name in ("norm", "mlp", "activation", "positions", "rope_scaling"):
            allowed = _choices(name)
            if getattr(self, name) not in allowed:
                raise GptlabError(f"config field {name}={getattr(self, name)!r} is not one of {allowed}")

    # ---- derived ----
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction) if self.positions == "rotary" else 0

    @property
    def qkv_dim(self) -> int:
        return (self.n_head + 2 * self.n_kv_head) * self.head_dim

    @property
    def rope_original(self) -> int:
        """The pretraining context rotary scaling extends (dynamic NTK starts past it; YaRN's ramp uses it)."""
        return self.rope_original_context or self.context_length

    def window(self, layer: int) -> int:
        return self.layer_windows[layer] if self.layer_windows else 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.mlp == "moe" and layer not in self.dense_layers

    # ---- serialisation ----
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        """A Config from a dict of its fields; nanoGPT's `block_size` is read as `context_length`."""
        d = {cls.RENAMED.get(k, k): v for k, v in d.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise GptlabError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**d)

    def architecture_diff(self, other: "Config") -> list[str]:
        """The ARCHITECTURE fields (and "layer_windows", compared per layer) where the two configs differ:
        empty when both build the same computation over the same weight shapes."""
        diff = [k for k in ARCHITECTURE if getattr(self, k) != getattr(other, k)]
        if [self.window(i) for i in range(self.n_layer)] != [other.window(i) for i in range(other.n_layer)]:
            diff.append("layer_windows")
        return diff

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        from gptlab.models.presets import PRESETS

        if name not in PRESETS:
            raise GptlabError(f"unknown preset {name!r}; `gptlab models` lists them")
        return cls.from_dict({**PRESETS[name], "name": name, **overrides})

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)


# the fields that decide the weights' shapes and the computation (not: names, dropout, init, token ids;
# layer_windows is compared per layer, since [] and [0, 0, ...] mean the same)
ARCHITECTURE = (
    "vocab_size", "context_length", "n_layer", "n_head", "n_embd", "n_kv_head", "head_dim", "intermediate_size",
    "norm", "post_norm", "final_norm", "parallel_residual", "shared_norm", "qkv_bias", "attn_out_bias", "qk_norm",
    "scale_attn", "scale_attn_by_layer", "upcast_attn", "positions", "rotary_fraction", "rotary_interleaved",
    "rope_theta", "rope_scaling", "rope_factor", "rope_original_context", "rope_attention_factor", "rope_beta_fast",
    "rope_beta_slow", "rope_truncate", "mlp", "activation",
    "mlp_bias", "n_expert", "n_expert_per_token", "moe_intermediate_size", "norm_topk_prob",
    "shared_expert_intermediate_size", "dense_layers", "tie_embeddings", "lm_head_bias",
)

def _choices(name: str) -> tuple[str, ...]:
    hint = {"norm": Norm, "mlp": MLPKind, "activation": Activation, "positions": Positions,
            "rope_scaling": RopeScaling}[name]
    return hint.__args__
