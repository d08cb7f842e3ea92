"""GPT-J (EleutherAI): parallel attention + MLP from one shared norm, interleaved partial rotary positions,
no attention biases, a biased untied head."""

from __future__ import annotations

from typing import Any

from gptlab.formats.family import ACTIVATIONS, Family, Fixed, HFConfig, Key, Rope, WeightRow, weight_and_bias
from gptlab.models.config import Config


class RotaryDim:
    """rotary_fraction <-> rotary_dim (rotated channels per head; default: the whole head)."""

    def read(self, hf: HFConfig, ours: dict[str, Any]) -> None:
        head_dim = ours["n_embd"] // ours["n_head"]
        ours["rotary_fraction"] = hf.get("rotary_dim", head_dim) / head_dim

    def write(self, config: Config, out: dict[str, Any]) -> None:
        out["rotary_dim"] = config.rotary_dim


def _weights() -> tuple[WeightRow, ...]:
    h = "transformer.h.{i}"
    rows = [WeightRow("wte.weight", ("transformer.wte.weight",))]
    rows += weight_and_bias("blocks.{i}.norm_1", f"{h}.ln_1")
    rows += weight_and_bias("blocks.{i}.attn.qkv", (f"{h}.attn.q_proj", f"{h}.attn.k_proj", f"{h}.attn.v_proj"))
    rows += weight_and_bias("blocks.{i}.attn.proj", f"{h}.attn.out_proj")
    rows += weight_and_bias("blocks.{i}.mlp.fc", f"{h}.mlp.fc_in") + weight_and_bias("blocks.{i}.mlp.proj", f"{h}.mlp.fc_out")
    return tuple(rows + weight_and_bias("norm_f", "transformer.ln_f") + weight_and_bias("lm_head", "lm_head"))


FAMILIES = [
    Family(
        model_type="gptj",
        causal_lm="GPTJForCausalLM",
        sequence_classifier="GPTJForSequenceClassification",
        weights=_weights(),
        config=(
            Key("vocab_size", "vocab_size"),
            Key("context_length", "n_positions", 2048),
            Key("n_layer", "n_layer"),
            Key("n_head", "n_head"),
            Key("n_embd", "n_embd"),
            Key("intermediate_size", "n_inner", None),
            Key("norm_eps", "layer_norm_epsilon", 1e-5),
            Key("activation", "activation_function", "gelu_new", values=ACTIVATIONS),
            Fixed("positions", "rotary"),
            Rope(parameters=False),
            RotaryDim(),
            Fixed("rotary_interleaved", True),
            Fixed("parallel_residual", True),
            Fixed("shared_norm", True),
            Fixed("qkv_bias", False),
            Fixed("attn_out_bias", False),
            Key("tie_embeddings", "tie_word_embeddings", False),
            Fixed("lm_head_bias", True),
        ),
    ),
]
