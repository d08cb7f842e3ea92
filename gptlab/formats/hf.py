"""Hugging Face checkpoints in and out: config.json <-> Config, and the weight-name map of each family.

A weight map is data: a list of `W(ours, hf_names)` rows. Loading concatenates the HF tensors (along the
output dim) into our tensor; saving splits ours back. Rows whose target our model does not have (a bias
that this config leaves out, a tied head) are skipped, so one table serves every config of a family.
The loader, the saver, the LoRA adapter export and the tests all read these tables.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from gptlab.config import Config
from gptlab.errors import GptlabError

# ---------------------------------------------------------------------------------------------------------
# weight-name maps


@dataclass(frozen=True)
class W:
    ours: str  # our parameter name; "{i}" is the layer
    hf: tuple[str, ...]  # HF names joined in this order along dim 0 (dim 1 for stacked experts); "{e}" = expert
    transpose: bool = False  # GPT-1/GPT-2 Conv1D stores weights as (in, out)
    neox_qkv: bool = False  # GPT-NeoX fuses q, k, v per head: rows (nh, 3, hs) instead of (3, nh, hs)
    per_expert: bool = False  # HF stores one tensor per expert; ours stacks them into (E, ...)


def _wb(ours: str, hf: str | tuple[str, ...], **kw) -> list[W]:
    """Weight and bias rows for a module."""
    hf = (hf,) if isinstance(hf, str) else hf
    return [W(f"{ours}.{p}", tuple(f"{h}.{p}" for h in hf), **kw) for p in ("weight", "bias")]


def _gpt2_like(emb: str, pos: str, has_ln_f: bool) -> list[W]:
    h = "transformer.h.{i}"
    rows = [W("wte.weight", (f"transformer.{emb}.weight",)), W("wpe.weight", (f"transformer.{pos}.weight",))]
    rows += _wb("blocks.{i}.norm_1", f"{h}.ln_1") + _wb("blocks.{i}.norm_2", f"{h}.ln_2")
    rows += _wb("blocks.{i}.attn.qkv", f"{h}.attn.c_attn", transpose=True)
    rows += _wb("blocks.{i}.attn.proj", f"{h}.attn.c_proj", transpose=True)
    rows += _wb("blocks.{i}.mlp.fc", f"{h}.mlp.c_fc", transpose=True)
    rows += _wb("blocks.{i}.mlp.proj", f"{h}.mlp.c_proj", transpose=True)
    if has_ln_f:
        rows += _wb("norm_f", "transformer.ln_f")
    return rows + [W("lm_head.weight", ("lm_head.weight",))]


def _gpt_neo() -> list[W]:
    h, a = "transformer.h.{i}", "transformer.h.{i}.attn.attention"
    rows = [W("wte.weight", ("transformer.wte.weight",)), W("wpe.weight", ("transformer.wpe.weight",))]
    rows += _wb("blocks.{i}.norm_1", f"{h}.ln_1") + _wb("blocks.{i}.norm_2", f"{h}.ln_2")
    rows += _wb("blocks.{i}.attn.qkv", (f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"))
    rows += _wb("blocks.{i}.attn.proj", f"{a}.out_proj")
    rows += _wb("blocks.{i}.mlp.fc", f"{h}.mlp.c_fc") + _wb("blocks.{i}.mlp.proj", f"{h}.mlp.c_proj")
    return rows + _wb("norm_f", "transformer.ln_f") + [W("lm_head.weight", ("lm_head.weight",))]


def _gptj() -> list[W]:
    h = "transformer.h.{i}"
    rows = [W("wte.weight", ("transformer.wte.weight",))]
    rows += _wb("blocks.{i}.norm_1", f"{h}.ln_1")
    rows += _wb("blocks.{i}.attn.qkv", (f"{h}.attn.q_proj", f"{h}.attn.k_proj", f"{h}.attn.v_proj"))
    rows += _wb("blocks.{i}.attn.proj", f"{h}.attn.out_proj")
    rows += _wb("blocks.{i}.mlp.fc", f"{h}.mlp.fc_in") + _wb("blocks.{i}.mlp.proj", f"{h}.mlp.fc_out")
    return rows + _wb("norm_f", "transformer.ln_f") + _wb("lm_head", "lm_head")


def _gpt_neox() -> list[W]:
    h = "gpt_neox.layers.{i}"
    rows = [W("wte.weight", ("gpt_neox.embed_in.weight",))]
    rows += _wb("blocks.{i}.norm_1", f"{h}.input_layernorm")
    rows += _wb("blocks.{i}.norm_2", f"{h}.post_attention_layernorm")
    rows += _wb("blocks.{i}.attn.qkv", f"{h}.attention.query_key_value", neox_qkv=True)
    rows += _wb("blocks.{i}.attn.proj", f"{h}.attention.dense")
    rows += _wb("blocks.{i}.mlp.fc", f"{h}.mlp.dense_h_to_4h")
    rows += _wb("blocks.{i}.mlp.proj", f"{h}.mlp.dense_4h_to_h")
    return rows + _wb("norm_f", "gpt_neox.final_layer_norm") + [W("lm_head.weight", ("embed_out.weight",))]


def _qwen() -> list[W]:
    """Qwen2 / Qwen2.5 / Qwen3 and their MoE variants (Llama-style names)."""
    h, a, m = "model.layers.{i}", "model.layers.{i}.self_attn", "model.layers.{i}.mlp"
    rows = [W("wte.weight", ("model.embed_tokens.weight",))]
    rows += _wb("blocks.{i}.norm_1", f"{h}.input_layernorm") + _wb("blocks.{i}.norm_2", f"{h}.post_attention_layernorm")
    rows += _wb("blocks.{i}.attn.qkv", (f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"))
    rows += _wb("blocks.{i}.attn.proj", f"{a}.o_proj")
    rows += [W("blocks.{i}.attn.q_norm.weight", (f"{a}.q_norm.weight",))]
    rows += [W("blocks.{i}.attn.k_norm.weight", (f"{a}.k_norm.weight",))]
    rows += _wb("blocks.{i}.mlp.fc", (f"{m}.gate_proj", f"{m}.up_proj")) + _wb("blocks.{i}.mlp.proj", f"{m}.down_proj")
    rows += [
        W("blocks.{i}.mlp.router.weight", (f"{m}.gate.weight",)),
        W("blocks.{i}.mlp.gate_up", (f"{m}.experts.{{e}}.gate_proj.weight", f"{m}.experts.{{e}}.up_proj.weight"), per_expert=True),
        W("blocks.{i}.mlp.down", (f"{m}.experts.{{e}}.down_proj.weight",), per_expert=True),
        W("blocks.{i}.mlp.shared_gate.weight", (f"{m}.shared_expert_gate.weight",)),
    ]
    rows += _wb("blocks.{i}.mlp.shared.fc", (f"{m}.shared_expert.gate_proj", f"{m}.shared_expert.up_proj"))
    rows += _wb("blocks.{i}.mlp.shared.proj", f"{m}.shared_expert.down_proj")
    return rows + _wb("norm_f", "model.norm") + [W("lm_head.weight", ("lm_head.weight",))]


WEIGHT_MAPS: dict[str, list[W]] = {
    "gpt2": _gpt2_like("wte", "wpe", has_ln_f=True),
    "openai-gpt": _gpt2_like("tokens_embed", "positions_embed", has_ln_f=False),
    "gpt_neo": _gpt_neo(),
    "gptj": _gptj(),
    "gpt_neox": _gpt_neox(),
    "qwen2": _qwen(),
    "qwen3": _qwen(),
    "qwen2_moe": _qwen(),
    "qwen3_moe": _qwen(),
}


def expand_map(config: Config, ours: set[str]) -> list[tuple[str, list[list[str]], W]]:
    """Concrete rows for this config: (our name, HF names per expert (one list when not per-expert), row)."""
    table = WEIGHT_MAPS[config.model_type]
    out = []
    for row in table:
        layers = range(config.n_layer) if "{i}" in row.ours else [None]
        for i in layers:
            name = row.ours.format(i=i)
            if name not in ours:
                continue
            hf = [h.replace("{i}", str(i)) for h in row.hf]
            groups = [[h.replace("{e}", str(e)) for h in hf] for e in range(config.n_expert)] if row.per_expert else [hf]
            out.append((name, groups, row))
    return out


def _our_names(model: torch.nn.Module) -> set[str]:
    names = set(model.state_dict().keys())
    if model.config.tie_embeddings:
        names.discard("lm_head.weight")
    return names


def _neox_reorder(t: torch.Tensor, config: Config, to_ours: bool) -> torch.Tensor:
    nh, hs = config.n_head, config.head_dim
    rest = t.shape[1:]
    if to_ours:  # (nh, 3, hs, ...) -> (3, nh, hs, ...)
        return t.reshape(nh, 3, hs, *rest).transpose(0, 1).reshape(3 * nh * hs, *rest)
    return t.reshape(3, nh, hs, *rest).transpose(0, 1).reshape(3 * nh * hs, *rest)


def hf_to_ours(config: Config, ours: set[str], get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Build our state dict from HF tensors fetched by name with `get`."""
    sd = {}
    for name, groups, row in expand_map(config, ours):
        stacked = []
        for hf_names in groups:
            parts = [get(h) for h in hf_names]
            if row.transpose:
                parts = [p.t() if p.ndim == 2 else p for p in parts]
            t = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
            if row.neox_qkv:
                t = _neox_reorder(t, config, to_ours=True)
            stacked.append(t)
        sd[name] = torch.stack(stacked) if row.per_expert else stacked[0]
    return sd


def ours_to_hf(config: Config, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split our state dict into HF tensors (the inverse of `hf_to_ours`)."""
    out = {}
    for name, groups, row in expand_map(config, set(state)):
        t = state[name]
        for e, hf_names in enumerate(groups):
            te = t[e] if row.per_expert else t
            if row.neox_qkv:
                te = _neox_reorder(te, config, to_ours=False)
            sizes = _split_sizes(config, name, te.shape[0], len(hf_names))
            for h, piece in zip(hf_names, te.split(sizes, dim=0)):
                if row.transpose and piece.ndim == 2:
                    piece = piece.t()
                out[h] = piece.contiguous()
    return out


def _split_sizes(config: Config, name: str, total: int, n: int) -> list[int]:
    if n == 1:
        return [total]
    if n == 3:  # q, k, v
        hs = config.head_dim
        return [config.n_head * hs, config.n_kv_head * hs, config.n_kv_head * hs]
    return [total // n] * n  # gate, up


# ---------------------------------------------------------------------------------------------------------
# config.json <-> Config

_ACT = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu_fast": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}


class _Fields:
    """Read an HF config dict, remembering which keys were consumed."""

    def __init__(self, d: dict[str, Any], model_type: str) -> None:
        self.d, self.model_type = d, model_type

    def get(self, key: str, default: Any = None) -> Any:
        v = self.d.get(key, default)
        return default if v is None else v

    def need(self, key: str) -> Any:
        if self.d.get(key) is None:
            raise GptlabError(f"config.json ({self.model_type}) lacks the required field {key!r}")
        return self.d[key]

    def act(self, key: str, default: str, table: dict[str, str] = _ACT) -> str:
        name = self.get(key, default)
        if name not in table:
            raise GptlabError(f"config.json field {key}={name!r} is not supported (supported: {sorted(table)})")
        return table[name]

    def refuse(self, key: str, ok: Callable[[Any], bool], why: str) -> None:
        if key in self.d and not ok(self.d[key]):
            raise GptlabError(f"config.json field {key}={self.d[key]!r} is not supported: {why}")

    def rope(self, theta_key: str = "rope_theta", default_theta: float = 10000.0) -> tuple[float, float | None]:
        """(rope_theta, partial_rotary_factor or None) from transformers 5's rope_parameters or older fields."""
        params = self.d.get("rope_parameters") or {}
        scaling = self.d.get("rope_scaling") or {}
        kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        if kind != "default":
            raise GptlabError(f"config.json rope scaling rope_type={kind!r} is not supported (only 'default')")
        theta = params.get("rope_theta", self.get(theta_key, default_theta))
        return float(theta), params.get("partial_rotary_factor")


def _special(f: _Fields) -> dict[str, Any]:
    return {"bos_token_id": f.get("bos_token_id"), "eos_token_id": f.get("eos_token_id"), "pad_token_id": f.get("pad_token_id")}


def _from_gpt2(f: _Fields) -> dict[str, Any]:
    f.refuse("scale_attn_by_inverse_layer_idx", lambda v: not v, "per-layer attention scaling")
    f.refuse("add_cross_attention", lambda v: not v, "cross-attention (gptlab models are decoder-only)")
    return dict(
        vocab_size=f.need("vocab_size"), block_size=f.get("n_positions", 1024), n_layer=f.need("n_layer"),
        n_head=f.need("n_head"), n_embd=f.need("n_embd"), intermediate_size=f.get("n_inner"),
        norm_eps=f.get("layer_norm_epsilon", 1e-5), activation=f.act("activation_function", "gelu_new"),
        scale_attn=f.get("scale_attn_weights", True), tie_embeddings=f.get("tie_word_embeddings", True),
    )


def _from_openai_gpt(f: _Fields) -> dict[str, Any]:
    # GPT-1's "gelu" is the tanh approximation (modeling_openai.ACT_FNS)
    act = f.act("afn", "gelu", {"gelu": "gelu_new", "relu": "relu", "silu": "silu", "swish": "silu"})
    return dict(
        vocab_size=f.need("vocab_size"), block_size=f.get("n_positions", 512), n_layer=f.need("n_layer"),
        n_head=f.need("n_head"), n_embd=f.need("n_embd"), norm_eps=f.get("layer_norm_epsilon", 1e-5),
        activation=act, post_norm=True, final_norm=False, tie_embeddings=f.get("tie_word_embeddings", True),
    )


def _from_gpt_neo(f: _Fields) -> dict[str, Any]:
    n_layer = f.need("num_layers")
    kinds = f.get("attention_layers") or [k for pattern, n in f.need("attention_types") for _ in range(n) for k in pattern]
    if len(kinds) != n_layer or set(kinds) - {"global", "local"}:
        raise GptlabError(f"config.json attention_layers={kinds!r} does not give global/local for {n_layer} layers")
    window = f.get("window_size", 256)
    return dict(
        vocab_size=f.need("vocab_size"), block_size=f.get("max_position_embeddings", 2048), n_layer=n_layer,
        n_head=f.need("num_heads"), n_embd=f.need("hidden_size"), intermediate_size=f.get("intermediate_size"),
        norm_eps=f.get("layer_norm_epsilon", 1e-5), activation=f.act("activation_function", "gelu_new"),
        qkv_bias=False, scale_attn=False, layer_windows=[window if k == "local" else 0 for k in kinds],
        tie_embeddings=f.get("tie_word_embeddings", True),
    )


def _from_gptj(f: _Fields) -> dict[str, Any]:
    n_embd, n_head = f.need("n_embd"), f.need("n_head")
    head_dim = n_embd // n_head
    theta, _ = f.rope()
    return dict(
        vocab_size=f.need("vocab_size"), block_size=f.get("n_positions", 2048), n_layer=f.need("n_layer"),
        n_head=n_head, n_embd=n_embd, intermediate_size=f.get("n_inner"), norm_eps=f.get("layer_norm_epsilon", 1e-5),
        activation=f.act("activation_function", "gelu_new"), positions="rotary", rope_theta=theta,
        rotary_fraction=f.get("rotary_dim", head_dim) / head_dim, rotary_interleaved=True,
        parallel_residual=True, shared_norm=True, qkv_bias=False, attn_out_bias=False,
        tie_embeddings=f.get("tie_word_embeddings", False), lm_head_bias=True,
    )


def _from_gpt_neox(f: _Fields) -> dict[str, Any]:
    theta, fraction = f.rope("rotary_emb_base")
    bias = f.get("attention_bias", True)
    return dict(
        vocab_size=f.need("vocab_size"), block_size=f.get("max_position_embeddings", 2048),
        n_layer=f.need("num_hidden_layers"), n_head=f.need("num_attention_heads"), n_embd=f.need("hidden_size"),
        intermediate_size=f.need("intermediate_size"), norm_eps=f.get("layer_norm_eps", 1e-5),
        activation=f.act("hidden_act", "gelu"), positions="rotary", rope_theta=theta,
        rotary_fraction=fraction if fraction is not None else f.get("rotary_pct", 1.0),
        parallel_residual=f.get("use_parallel_residual", True), qkv_bias=bias, attn_out_bias=bias,
        tie_embeddings=f.get("tie_word_embeddings", False),
    )


def _from_qwen(f: _Fields) -> dict[str, Any]:
    mt = f.model_type
    theta, fraction = f.rope()
    if fraction not in (None, 1.0):
        raise GptlabError(f"config.json partial_rotary_factor={fraction} is not supported for {mt}")
    n_layer = f.need("num_hidden_layers")
    qwen3 = mt in ("qwen3", "qwen3_moe")
    windows = []
    if f.get("use_sliding_window", False):
        kinds = f.get("layer_types") or [
            "sliding_attention" if i >= f.get("max_window_layers", 0) else "full_attention" for i in range(n_layer)
        ]
        windows = [f.need("sliding_window") if k == "sliding_attention" else 0 for k in kinds]
    if qwen3:
        bias = f.get("attention_bias", False)
        qkv_bias, out_bias = bias, bias
    else:
        qkv_bias, out_bias = f.get("qkv_bias", True), False
    d = dict(
        vocab_size=f.need("vocab_size"), block_size=f.get("max_position_embeddings", 32768), n_layer=n_layer,
        n_head=f.need("num_attention_heads"), n_embd=f.need("hidden_size"),
        n_kv_head=f.get("num_key_value_heads", f.need("num_attention_heads")), head_dim=f.get("head_dim"),
        intermediate_size=f.need("intermediate_size"), norm="rmsnorm", norm_eps=f.get("rms_norm_eps", 1e-6),
        mlp="glu", activation=f.act("hidden_act", "silu"), mlp_bias=False, qkv_bias=qkv_bias, attn_out_bias=out_bias,
        qk_norm=qwen3, positions="rotary", rope_theta=theta, layer_windows=windows,
        tie_embeddings=f.get("tie_word_embeddings", False),
    )
    if mt.endswith("_moe"):
        n_expert = f.get("num_experts", f.get("num_local_experts", 0))
        step, only = f.get("decoder_sparse_step", 1), f.get("mlp_only_layers", [])
        dense = [i for i in range(n_layer) if i in only or n_expert == 0 or (i + 1) % step != 0]
        d.update(
            mlp="moe", n_expert=n_expert, n_expert_per_token=f.need("num_experts_per_tok"),
            moe_intermediate_size=f.need("moe_intermediate_size"), norm_topk_prob=f.get("norm_topk_prob", False),
            shared_expert_intermediate_size=0 if qwen3 else f.get("shared_expert_intermediate_size", 0),
            dense_layers=dense,
        )
    return d


_READERS: dict[str, Callable[[_Fields], dict[str, Any]]] = {
    "gpt2": _from_gpt2, "openai-gpt": _from_openai_gpt, "gpt_neo": _from_gpt_neo, "gptj": _from_gptj,
    "gpt_neox": _from_gpt_neox, "qwen2": _from_qwen, "qwen3": _from_qwen, "qwen2_moe": _from_qwen,
    "qwen3_moe": _from_qwen,
}

ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel", "openai-gpt": "OpenAIGPTLMHeadModel", "gpt_neo": "GPTNeoForCausalLM",
    "gptj": "GPTJForCausalLM", "gpt_neox": "GPTNeoXForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
}


def config_from_hf(d: dict[str, Any]) -> Config:
    """Config from the dict of an HF config.json; unknown architectures or unsupported fields raise."""
    mt = d.get("model_type")
    if mt not in _READERS:
        raise GptlabError(
            f"config.json model_type={mt!r} is not supported (supported: {', '.join(sorted(_READERS))})"
        )
    f = _Fields(d, mt)
    fields = _READERS[mt](f)
    try:
        return Config(model_type=mt, name=d.get("_name_or_path") or mt, **fields, **_special(f))
    except TypeError as e:  # a field of the wrong type in config.json
        raise GptlabError(f"config.json ({mt}) has a malformed field: {e}") from None


def config_to_hf(c: Config, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """HF config.json dict for this Config; raises when the config has no equivalent in that HF family."""
    mt = c.model_type
    if mt not in _READERS:
        raise GptlabError(f"cannot save model_type={mt!r} (supported: {', '.join(sorted(_READERS))})")
    act_out = {"gelu_new": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}[c.activation]
    if mt == "gpt2":
        d = dict(vocab_size=c.vocab_size, n_positions=c.block_size, n_layer=c.n_layer, n_head=c.n_head,
                 n_embd=c.n_embd, n_inner=c.intermediate_size, layer_norm_epsilon=c.norm_eps,
                 activation_function=act_out, scale_attn_weights=c.scale_attn)
    elif mt == "openai-gpt":
        d = dict(vocab_size=c.vocab_size, n_positions=c.block_size, n_layer=c.n_layer, n_head=c.n_head,
                 n_embd=c.n_embd, layer_norm_epsilon=c.norm_eps,
                 afn={"gelu_new": "gelu", "relu": "relu", "silu": "silu", "gelu": "exact-gelu"}[c.activation])
    elif mt == "gpt_neo":
        kinds = ["local" if w else "global" for w in (c.layer_windows or [0] * c.n_layer)]
        windows = {w for w in c.layer_windows if w} or {256}
        if len(windows) > 1:
            raise GptlabError("gpt_neo checkpoints have one window_size for all local layers")
        d = dict(vocab_size=c.vocab_size, max_position_embeddings=c.block_size, num_layers=c.n_layer,
                 num_heads=c.n_head, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
                 layer_norm_epsilon=c.norm_eps, activation_function=act_out,
                 attention_types=[[[k], 1] for k in kinds], window_size=windows.pop())
    elif mt == "gptj":
        d = dict(vocab_size=c.vocab_size, n_positions=c.block_size, n_layer=c.n_layer, n_head=c.n_head,
                 n_embd=c.n_embd, n_inner=c.intermediate_size, layer_norm_epsilon=c.norm_eps,
                 activation_function=act_out, rotary_dim=c.rotary_dim, rope_theta=c.rope_theta)
    elif mt == "gpt_neox":
        d = dict(vocab_size=c.vocab_size, max_position_embeddings=c.block_size, num_hidden_layers=c.n_layer,
                 num_attention_heads=c.n_head, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
                 layer_norm_eps=c.norm_eps, hidden_act=act_out, use_parallel_residual=c.parallel_residual,
                 attention_bias=c.qkv_bias, rotary_pct=c.rotary_fraction, rotary_emb_base=c.rope_theta,
                 rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta,
                                  "partial_rotary_factor": c.rotary_fraction})
    else:  # the Qwen line
        windows = {w for w in c.layer_windows if w}
        if len(windows) > 1:
            raise GptlabError(f"{mt} checkpoints have one sliding_window for all sliding layers")
        d = dict(vocab_size=c.vocab_size, max_position_embeddings=c.block_size, num_hidden_layers=c.n_layer,
                 num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, hidden_size=c.n_embd,
                 head_dim=c.head_dim, intermediate_size=c.intermediate_size, rms_norm_eps=c.norm_eps,
                 hidden_act=act_out, rope_theta=c.rope_theta,
                 rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                 use_sliding_window=bool(windows), sliding_window=windows.pop() if windows else None,
                 max_window_layers=c.n_layer,
                 layer_types=["sliding_attention" if c.window(i) else "full_attention" for i in range(c.n_layer)])
        if mt in ("qwen3", "qwen3_moe"):
            d["attention_bias"] = c.qkv_bias
        else:
            d["qkv_bias"] = c.qkv_bias
        if mt.endswith("_moe"):
            d.update(num_experts=c.n_expert, num_local_experts=c.n_expert, num_experts_per_tok=c.n_expert_per_token,
                     moe_intermediate_size=c.moe_intermediate_size, norm_topk_prob=c.norm_topk_prob,
                     decoder_sparse_step=1, mlp_only_layers=list(c.dense_layers))
            if mt == "qwen2_moe":
                d["shared_expert_intermediate_size"] = c.shared_expert_intermediate_size
    d.update(model_type=mt, architectures=[ARCHITECTURES[mt]], tie_word_embeddings=c.tie_embeddings,
             bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
             dtype=str(dtype).removeprefix("torch."))
    # what we write must read back as the same model, or the config has no HF equivalent
    back = config_from_hf(d)
    for key in _STRUCTURAL:
        if getattr(back, key) != getattr(c, key):
            raise GptlabError(
                f"this config cannot be saved as an HF {mt} checkpoint: {key}={getattr(c, key)!r} "
                f"(that family has {getattr(back, key)!r}); pick a model_type whose architecture matches"
            )
    if not _windows_equal(back, c):
        raise GptlabError(f"this config's local attention windows cannot be expressed in an HF {mt} config.json")
    return d


_STRUCTURAL = (
    "vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head", "head_dim", "intermediate_size",
    "norm", "post_norm", "final_norm", "parallel_residual", "shared_norm", "qkv_bias", "attn_out_bias", "qk_norm",
    "scale_attn", "positions", "rotary_fraction", "rotary_interleaved", "rope_theta", "mlp", "activation",
    "mlp_bias", "n_expert", "n_expert_per_token", "moe_intermediate_size", "norm_topk_prob",
    "shared_expert_intermediate_size", "dense_layers", "tie_embeddings", "lm_head_bias",
)


def _windows_equal(a: Config, b: Config) -> bool:
    return [a.window(i) for i in range(a.n_layer)] == [b.window(i) for i in range(b.n_layer)]


# ---------------------------------------------------------------------------------------------------------
# load and save

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


def resolve(path_or_id: str | os.PathLike) -> Path:
    """A local model dir, or a hub id downloaded through huggingface_hub (weights as safetensors only)."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    s = str(path_or_id)
    if p.exists():
        raise GptlabError(f"{s} is a file; pass the model directory that holds config.json")
    if s.startswith((".", "/", "~")) or s.count("/") > 1 or os.sep != "/" and os.sep in s:
        raise GptlabError(f"model directory {s} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=s, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated repo: all end the same way for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GptlabError(
            f"no local directory {s!r}, and downloading {s!r} from the Hugging Face Hub failed ({reason[:160]}); "
            f"download it where you have network access and pass the local directory instead"
        ) from None


def read_config(path: Path) -> Config:
    f = path / "config.json"
    if not f.is_file():
        raise GptlabError(f"{path} has no config.json; is it a Hugging Face-format model directory?")
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GptlabError(f"{f} is not valid JSON: {e}") from None
    return config_from_hf(d)


def _weight_files(path: Path) -> list[Path]:
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise GptlabError(f"{index} is malformed: {e}") from None
        files = [path / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise GptlabError(f"shard(s) listed in {index.name} are missing: {', '.join(missing)}")
        return files
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise GptlabError(f"{path} holds only pickled weights (.bin/.pt); gptlab loads safetensors only (convert them first)")
    raise GptlabError(f"{path} has no model.safetensors")


def load(
    path_or_id: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
):
    """Load an HF-format model dir (or hub id) into a gptlab `GPT`, in eval mode.

    dtype: None keeps the checkpoint's dtype (config.json `dtype`/`torch_dtype`, fp32 when absent).
    """
    return load_with_extras(path_or_id, dtype, device)[0]


def load_with_extras(
    path_or_id: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    extras: tuple[str, ...] = (),
    head_optional: bool = False,
) -> tuple:
    """`load`, plus the named non-GPT tensors of the checkpoint (e.g. a classifier's `score.weight`), returned
    as {name: tensor} in the model's dtype and device; each must be present.

    head_optional: an untied checkpoint without lm_head.weight (transformers' *ForSequenceClassification
    saves none) gets a zero head instead of an error.
    """
    from safetensors import SafetensorError, safe_open

    from gptlab.model import GPT

    path = resolve(path_or_id)
    config = read_config(path)
    raw = json.loads((path / "config.json").read_text())
    dtype = parse_dtype(dtype or raw.get("dtype") or raw.get("torch_dtype") or "float32")
    device = torch.device(device or "cpu")
    files = _weight_files(path)

    with torch.device("meta"):
        model = GPT(config)
    tensors: dict[str, torch.Tensor] = {}
    try:
        for f in files:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for k in sf.keys():
                    tensors[k] = sf.get_tensor(k)
    except (SafetensorError, OSError, ValueError) as e:
        raise GptlabError(f"could not read {f}: {e} (truncated or not a safetensors file?)") from None

    found = {}
    for name in extras:
        if name not in tensors:
            raise GptlabError(f"{path} has no {name}: not a checkpoint of that kind (a plain language model?)")
        found[name] = tensors.pop(name).to(device=device, dtype=dtype)
    if head_optional and not config.tie_embeddings and "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = torch.zeros(config.vocab_size, config.n_embd)

    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise GptlabError(f"{path} lacks weight {name!r} that its config.json ({config.model_type}) requires")
        return tensors.pop(name)

    ours = _our_names(model)
    sd = hf_to_ours(config, ours, get)
    expected = model.state_dict()
    for name, t in sd.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise GptlabError(
                f"weight shape mismatch for {name}: checkpoint has {tuple(t.shape)}, config.json implies "
                f"{tuple(expected[name].shape)}"
            )
        # contiguous (out, in) rows for every family: GPT-2's Conv1D (in, out) views are copied once here,
        # since row-major weights are what the decode kernels stream fastest (gptlab/kernels)
        sd[name] = t.to(device=device, dtype=dtype).contiguous()
    leftover = [k for k in tensors if not k.endswith(("attn.bias", "attn.masked_bias", "rotary_emb.inv_freq"))]
    if leftover and not (config.tie_embeddings and leftover == ["lm_head.weight"]):
        raise GptlabError(f"{path} has weights gptlab does not expect for {config.model_type}: {', '.join(leftover[:5])}")
    model.load_state_dict(sd, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise GptlabError(f"{path} does not provide {', '.join(missing[:5])}")
    model.init_buffers(device=device)
    model.source = str(path)
    return model.eval(), found


def save(
    model,
    path: str | os.PathLike,
    tokenizer=None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files); atomically replaces an existing dir.

    extra_tensors / extra_config: added to the checkpoint as they are (HF names), e.g. a classification
    head's `score.weight` with `architectures` and `id2label`.
    """
    from safetensors.torch import save_file

    config = model.config
    path = Path(path)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    dtype = model.wte.weight.dtype
    hf_config = config_to_hf(config, dtype)
    tensors = {k: v.to("cpu").contiguous() for k, v in ours_to_hf(config, state).items()}
    tensors.update({k: v.detach().to("cpu").contiguous() for k, v in (extra_tensors or {}).items()})
    hf_config.update(extra_config or {})
    with staged_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        gen = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_config[k] is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "gptlab_config": json.dumps(config.to_dict())})
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path


@contextlib.contextmanager
def staged_dir(dest: Path):
    """Yield a hidden temporary dir beside `dest`; on success it replaces `dest`, on error it is removed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the files themselves are synced
        pass
    finally:
        os.close(fd)


def replace_dir(new: Path, dest: Path) -> None:
    """Move a finished dir into place: the old `dest` stays valid until the new one is complete.

    The new files are flushed to disk before the rename, so a power cut leaves the old or the new dir whole,
    never a renamed dir of empty files.
    """
    for f in sorted(new.rglob("*"), reverse=True):  # files before the dirs that hold them
        _fsync(f)
    _fsync(new)
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(new, dest)
    _fsync(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if dtype not in names:
        raise GptlabError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    return names[dtype]
