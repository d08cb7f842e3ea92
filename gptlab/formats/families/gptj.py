"""GPT-J (EleutherAI): parallel attention + MLP from one shared norm, interleaved partial rotary positions,
no attention biases, a biased untied head."""

from __future__ import annotations

from typing import Any

from gptlab.formats.family import ACTIVATIONS, Family, HFConfig, Key, Rope, WeightRow, fixed, keys, weight_and_bias
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


CONFIG = (
    *keys(vocab_size="vocab_size", context_length=("n_positions", 2048), n_layer="n_layer", n_head="n_head",
          n_embd="n_embd", intermediate_size=("n_inner", None), norm_eps=("layer_norm_epsilon", 1e-5),
          tie_embeddings=("tie_word_embeddings", False)),
    Key("activation", "activation_function", "gelu_new", values=ACTIVATIONS),
    *fixed(positions="rotary", rotary_interleaved=True, parallel_residual=True, shared_norm=True,
           qkv_bias=False, attn_out_bias=False, lm_head_bias=True),
    Rope(parameters=False, scalings=("default",)),  # GPT-J's own sinusoids: no scaling in transformers
    RotaryDim(),
)

FAMILIES = [Family("gptj", causal_lm="GPTJForCausalLM", sequence_classifier="GPTJForSequenceClassification",
                   weights=_weights(), config=CONFIG)]
