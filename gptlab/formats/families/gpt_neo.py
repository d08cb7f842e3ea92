"""GPT-Neo (EleutherAI), also the layout of gptlab's GPT-3 presets: GPT-2's block with alternating global and
local attention layers, no q/k/v bias and unscaled attention scores."""

from __future__ import annotations

from typing import Any

from gptlab.errors import GptlabError
from gptlab.formats.family import ACTIVATIONS, Family, HFConfig, Key, WeightRow, fixed, keys, weight_and_bias
from gptlab.models.config import Config


class LocalLayers:
    """layer_windows <-> attention_layers / attention_types (["global", "local"] per layer) + window_size."""

    def read(self, hf: HFConfig, ours: dict[str, Any]) -> None:
        n_layer = ours["n_layer"]
        kinds = hf.get("attention_layers") or [k for pattern, n in hf.need("attention_types") for _ in range(n)
                                               for k in pattern]
        if len(kinds) != n_layer or set(kinds) - {"global", "local"}:
            raise GptlabError(f"config.json attention_layers={kinds!r} does not give global/local for {n_layer} layers")
        window = hf.get("window_size", 256)
        ours["layer_windows"] = [window if k == "local" else 0 for k in kinds]

    def write(self, config: Config, out: dict[str, Any]) -> None:
        windows = [config.window(i) for i in range(config.n_layer)]
        sizes = {w for w in windows if w} or {256}
        if len(sizes) > 1:
            raise GptlabError("gpt_neo checkpoints have one window_size for all local layers")
        out["attention_types"] = [[["local" if w else "global"], 1] for w in windows]
        out["window_size"] = sizes.pop()


def _weights() -> tuple[WeightRow, ...]:
    h, a = "transformer.h.{i}", "transformer.h.{i}.attn.attention"
    rows = [WeightRow("wte.weight", ("transformer.wte.weight",)), WeightRow("wpe.weight", ("transformer.wpe.weight",))]
    rows += weight_and_bias("blocks.{i}.norm_1", f"{h}.ln_1") + weight_and_bias("blocks.{i}.norm_2", f"{h}.ln_2")
    rows += weight_and_bias("blocks.{i}.attn.qkv", (f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"))
    rows += weight_and_bias("blocks.{i}.attn.proj", f"{a}.out_proj")
    rows += weight_and_bias("blocks.{i}.mlp.fc", f"{h}.mlp.c_fc") + weight_and_bias("blocks.{i}.mlp.proj", f"{h}.mlp.c_proj")
    return tuple(rows + weight_and_bias("norm_f", "transformer.ln_f") + [WeightRow("lm_head.weight", ("lm_head.weight",))])


CONFIG = (
    *keys(vocab_size="vocab_size", context_length=("max_position_embeddings", 2048), n_layer="num_layers",
          n_head="num_heads", n_embd="hidden_size", intermediate_size=("intermediate_size", None),
          norm_eps=("layer_norm_epsilon", 1e-5), tie_embeddings=("tie_word_embeddings", True)),
    Key("activation", "activation_function", "gelu_new", values=ACTIVATIONS),
    *fixed(qkv_bias=False, scale_attn=False),
    LocalLayers(),
)

FAMILIES = [Family("gpt_neo", causal_lm="GPTNeoForCausalLM", sequence_classifier="GPTNeoForSequenceClassification",
                   weights=_weights(), config=CONFIG)]
