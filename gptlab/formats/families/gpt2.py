"""GPT-2 (Radford et al. 2019): pre-norm LayerNorm blocks, learned positions, GELU MLP, tied head.

transformers' GPT2LMHeadModel stores q, k and v fused in `c_attn` and every weight as a Conv1D (in, out).
"""

from gptlab.formats.family import (ACTIVATIONS, Family, GGUFSpec, Key, Refuse, WeightRow, gguf_fused_block_rows, keys,
                                  weight_and_bias)


def gpt2_weights(embedding: str, positions: str, final_norm: bool) -> tuple[WeightRow, ...]:
    """GPT-2's names; GPT-1 has the same blocks under other embedding names and no final norm."""
    h = "transformer.h.{i}"
    rows = [WeightRow("wte.weight", (f"transformer.{embedding}.weight",)),
            WeightRow("wpe.weight", (f"transformer.{positions}.weight",))]
    rows += weight_and_bias("blocks.{i}.norm_1", f"{h}.ln_1") + weight_and_bias("blocks.{i}.norm_2", f"{h}.ln_2")
    rows += weight_and_bias("blocks.{i}.attn.qkv", f"{h}.attn.c_attn", transpose=True)
    rows += weight_and_bias("blocks.{i}.attn.proj", f"{h}.attn.c_proj", transpose=True)
    rows += weight_and_bias("blocks.{i}.mlp.fc", f"{h}.mlp.c_fc", transpose=True)
    rows += weight_and_bias("blocks.{i}.mlp.proj", f"{h}.mlp.c_proj", transpose=True)
    if final_norm:
        rows += weight_and_bias("norm_f", "transformer.ln_f")
    return tuple(rows + [WeightRow("lm_head.weight", ("lm_head.weight",))])


CONFIG = (
    Refuse("add_cross_attention", lambda v: not v, "cross-attention (gptlab models are decoder-only)"),
    *keys(vocab_size="vocab_size", context_length=("n_positions", 1024), n_layer="n_layer", n_head="n_head",
          n_embd="n_embd", intermediate_size=("n_inner", None), norm_eps=("layer_norm_epsilon", 1e-5)),
    Key("activation", "activation_function", "gelu_new", values=ACTIVATIONS),
    *keys(scale_attn=("scale_attn_weights", True), scale_attn_by_layer=("scale_attn_by_inverse_layer_idx", False),
          upcast_attn=("reorder_and_upcast_attn", False), tie_embeddings=("tie_word_embeddings", True)),
)

# llama.cpp's gpt2 graph (src/models/gpt2.cpp): GELU (the tanh form, so exact-erf models are approximated),
# scores scaled by 1/sqrt(head_dim) alone
GGUF = GGUFSpec("gpt2", tuple(
    [("wte.weight", ("token_embd.weight",)), ("wpe.weight", ("position_embd.weight",))]
    + gguf_fused_block_rows()),
    requires=(("activation", ("gelu_new", "gelu")), ("scale_attn", (True,)), ("scale_attn_by_layer", (False,))))

FAMILIES = [Family("gpt2", causal_lm="GPT2LMHeadModel", sequence_classifier="GPT2ForSequenceClassification",
                   weights=gpt2_weights("wte", "wpe", final_norm=True), config=CONFIG, gguf=GGUF)]
