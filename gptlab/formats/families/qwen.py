"""Qwen2 / Qwen2.5, Qwen3 and their mixture-of-experts models (Llama-style names): RMSNorm, SwiGLU,
grouped-query attention, rotary positions; Qwen2 has q/k/v biases, Qwen3 q/k RMSNorm instead; Qwen2-MoE adds
a gated shared expert."""

from __future__ import annotations

from typing import Any

from gptlab.errors import GptlabError
from gptlab.formats.family import (ACTIVATIONS, Codec, Family, Fixed, GGUFSpec, HFConfig, Key, Rope, WeightRow, fixed,
                                  gguf_weight_and_bias, keys, weight_and_bias)
from gptlab.models.config import Config


class SlidingWindows:
    """layer_windows <-> use_sliding_window + sliding_window, per layer by layer_types (or max_window_layers)."""

    def read(self, hf: HFConfig, ours: dict[str, Any]) -> None:
        n_layer = ours["n_layer"]
        windows: list[int] = []
        if hf.get("use_sliding_window", False):
            kinds = hf.get("layer_types") or [
                "sliding_attention" if i >= hf.get("max_window_layers", 0) else "full_attention" for i in range(n_layer)
            ]
            windows = [hf.need("sliding_window") if k == "sliding_attention" else 0 for k in kinds]
        ours["layer_windows"] = windows

    def write(self, config: Config, out: dict[str, Any]) -> None:
        sizes = {w for w in config.layer_windows if w}
        if len(sizes) > 1:
            raise GptlabError(f"{out['model_type']} checkpoints have one sliding_window for all sliding layers")
        out.update(use_sliding_window=bool(sizes), sliding_window=sizes.pop() if sizes else None,
                   max_window_layers=config.n_layer,
                   layer_types=["sliding_attention" if config.window(i) else "full_attention"
                                for i in range(config.n_layer)])


class Experts:
    """The routed experts: counts, sizes, and which layers stay dense (decoder_sparse_step, mlp_only_layers)."""

    def __init__(self, shared: bool) -> None:
        self.shared = shared  # Qwen2-MoE's always-on expert with a sigmoid gate

    def read(self, hf: HFConfig, ours: dict[str, Any]) -> None:
        n_layer = ours["n_layer"]
        n_expert = hf.get("num_experts", hf.get("num_local_experts", 0))
        step, only = hf.get("decoder_sparse_step", 1), hf.get("mlp_only_layers", [])
        ours.update(
            mlp="moe", n_expert=n_expert, n_expert_per_token=hf.need("num_experts_per_tok"),
            moe_intermediate_size=hf.need("moe_intermediate_size"), norm_topk_prob=hf.get("norm_topk_prob", False),
            shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size", 0) if self.shared else 0,
            dense_layers=[i for i in range(n_layer) if i in only or n_expert == 0 or (i + 1) % step != 0],
        )

    def write(self, config: Config, out: dict[str, Any]) -> None:
        out.update(num_experts=config.n_expert, num_local_experts=config.n_expert,
                   num_experts_per_tok=config.n_expert_per_token, moe_intermediate_size=config.moe_intermediate_size,
                   norm_topk_prob=config.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=list(config.dense_layers))
        if self.shared:
            out["shared_expert_intermediate_size"] = config.shared_expert_intermediate_size


def _weights() -> tuple[WeightRow, ...]:
    h, a, m = "model.layers.{i}", "model.layers.{i}.self_attn", "model.layers.{i}.mlp"
    rows = [WeightRow("wte.weight", ("model.embed_tokens.weight",))]
    rows += weight_and_bias("blocks.{i}.norm_1", f"{h}.input_layernorm")
    rows += weight_and_bias("blocks.{i}.norm_2", f"{h}.post_attention_layernorm")
    rows += weight_and_bias("blocks.{i}.attn.qkv", (f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"))
    rows += weight_and_bias("blocks.{i}.attn.proj", f"{a}.o_proj")
    rows += [WeightRow("blocks.{i}.attn.q_norm.weight", (f"{a}.q_norm.weight",)),
             WeightRow("blocks.{i}.attn.k_norm.weight", (f"{a}.k_norm.weight",))]
    rows += weight_and_bias("blocks.{i}.mlp.fc", (f"{m}.gate_proj", f"{m}.up_proj"))
    rows += weight_and_bias("blocks.{i}.mlp.proj", f"{m}.down_proj")
    rows += [
        WeightRow("blocks.{i}.mlp.router.weight", (f"{m}.gate.weight",)),
        WeightRow("blocks.{i}.mlp.gate_up", (f"{m}.experts.{{e}}.gate_proj.weight", f"{m}.experts.{{e}}.up_proj.weight"),
                  per_expert=True),
        WeightRow("blocks.{i}.mlp.down", (f"{m}.experts.{{e}}.down_proj.weight",), per_expert=True),
        WeightRow("blocks.{i}.mlp.shared_gate.weight", (f"{m}.shared_expert_gate.weight",)),
    ]
    rows += weight_and_bias("blocks.{i}.mlp.shared.fc", (f"{m}.shared_expert.gate_proj", f"{m}.shared_expert.up_proj"))
    rows += weight_and_bias("blocks.{i}.mlp.shared.proj", f"{m}.shared_expert.down_proj")
    return tuple(rows + weight_and_bias("norm_f", "model.norm") + [WeightRow("lm_head.weight", ("lm_head.weight",))])


def _config(qwen3: bool, experts: Codec | None) -> tuple[Codec, ...]:
    if qwen3:  # one attention_bias for q/k/v and the output projection, and q/k RMSNorm
        biases: tuple[Codec, ...] = (Key(("qkv_bias", "attn_out_bias"), "attention_bias", False),)
    else:  # Qwen2 biases q, k and v only
        biases = (Key("qkv_bias", "qkv_bias", True), Fixed("attn_out_bias", False))
    return (
        *keys(vocab_size="vocab_size", context_length=("max_position_embeddings", 32768), n_layer="num_hidden_layers",
              n_head="num_attention_heads", n_embd="hidden_size"),
        Key("n_kv_head", "num_key_value_heads", lambda hf, ours: ours["n_head"]),  # default: one per query head
        *keys(head_dim=("head_dim", None), intermediate_size="intermediate_size", norm_eps=("rms_norm_eps", 1e-6),
              tie_embeddings=("tie_word_embeddings", False)),
        Key("activation", "hidden_act", "silu", values=ACTIVATIONS),
        *biases,
        *fixed(norm="rmsnorm", mlp="glu", mlp_bias=False, qk_norm=qwen3, positions="rotary"),
        Rope(whole_heads=True),
        SlidingWindows(),
        *((experts,) if experts else ()),
    )


def _gguf(arch: str, qwen3: bool, experts: Experts | None, topk_renormalised: bool = False,
          head_required: bool = False) -> GGUFSpec:
    """llama.cpp's qwen2 / qwen3 / qwen2moe / qwen3moe (src/models/<arch>.cpp): what each loader reads.

    Their graphs have no attention-output bias and rotate whole heads; the MoE graphs route every layer (no dense
    layers), renormalise the top-k weights in qwen3moe and not in qwen2moe, and qwen2moe always adds its gated
    shared expert and reads output.weight even when the head is tied.
    """
    b = "blk.{i}"
    rows = [("wte.weight", ("token_embd.weight",)), ("blocks.{i}.norm_1.weight", (f"{b}.attn_norm.weight",)),
            *gguf_weight_and_bias("blocks.{i}.attn.qkv", (f"{b}.attn_q", f"{b}.attn_k", f"{b}.attn_v")),
            ("blocks.{i}.attn.proj.weight", (f"{b}.attn_output.weight",)),
            ("blocks.{i}.norm_2.weight", (f"{b}.ffn_norm.weight",))]
    if qwen3:
        rows += [("blocks.{i}.attn.q_norm.weight", (f"{b}.attn_q_norm.weight",)),
                 ("blocks.{i}.attn.k_norm.weight", (f"{b}.attn_k_norm.weight",))]
    if experts is None:
        rows += [("blocks.{i}.mlp.fc.weight", (f"{b}.ffn_gate.weight", f"{b}.ffn_up.weight")),
                 ("blocks.{i}.mlp.proj.weight", (f"{b}.ffn_down.weight",))]
    else:  # experts stacked (E, 2I, C) and (E, C, I): llama.cpp's ffn_*_exps are the same 3-D tensors
        rows += [("blocks.{i}.mlp.router.weight", (f"{b}.ffn_gate_inp.weight",)),
                 ("blocks.{i}.mlp.gate_up", (f"{b}.ffn_gate_exps.weight", f"{b}.ffn_up_exps.weight")),
                 ("blocks.{i}.mlp.down", (f"{b}.ffn_down_exps.weight",))]
    if experts is not None and experts.shared:
        rows += [("blocks.{i}.mlp.shared_gate.weight", (f"{b}.ffn_gate_inp_shexp.weight",)),
                 ("blocks.{i}.mlp.shared.fc.weight", (f"{b}.ffn_gate_shexp.weight", f"{b}.ffn_up_shexp.weight")),
                 ("blocks.{i}.mlp.shared.proj.weight", (f"{b}.ffn_down_shexp.weight",))]
    rows += [("norm_f.weight", ("output_norm.weight",)), ("lm_head.weight", ("output.weight",))]
    requires: tuple[tuple[str, tuple[Any, ...]], ...] = (
        ("activation", ("silu",)), ("attn_out_bias", (False,)), ("rotary_fraction", (1.0,)))
    if experts is not None:
        requires += (("dense_layers", ([],)), ("norm_topk_prob", (topk_renormalised,)))
    return GGUFSpec(arch, tuple(rows), requires=requires, head_required=head_required,
                    hparams=_moe_hparams if experts is not None else None)


def _moe_hparams(w, c: Config) -> None:
    w.add_expert_count(c.n_expert)
    w.add_expert_used_count(c.n_expert_per_token)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    if c.shared_expert_intermediate_size:
        w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)


FAMILIES = [
    Family(model_type, causal_lm=f"{name}ForCausalLM", sequence_classifier=f"{name}ForSequenceClassification",
           weights=_weights(), config=_config(qwen3, experts), gguf=gguf)
    for model_type, name, qwen3, experts, gguf in (
        ("qwen2", "Qwen2", False, None, _gguf("qwen2", qwen3=False, experts=None)),
        ("qwen3", "Qwen3", True, None, _gguf("qwen3", qwen3=True, experts=None)),
        ("qwen2_moe", "Qwen2Moe", False, Experts(shared=True),
         _gguf("qwen2moe", qwen3=False, experts=Experts(shared=True), head_required=True)),
        ("qwen3_moe", "Qwen3Moe", True, Experts(shared=False),
         _gguf("qwen3moe", qwen3=True, experts=Experts(shared=False), topk_renormalised=True)),
    )
]
