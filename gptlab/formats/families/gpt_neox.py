"""GPT-NeoX / Pythia (EleutherAI): partial rotary positions, parallel (or sequential) residual, exact GELU,
q/k/v fused per head."""

from gptlab.formats.family import (ACTIVATIONS, Family, GGUFSpec, Key, Rope, WeightRow, fixed, gguf_fused_block_rows,
                                  keys, weight_and_bias)


def _weights() -> tuple[WeightRow, ...]:
    h = "gpt_neox.layers.{i}"
    rows = [WeightRow("wte.weight", ("gpt_neox.embed_in.weight",))]
    rows += weight_and_bias("blocks.{i}.norm_1", f"{h}.input_layernorm")
    rows += weight_and_bias("blocks.{i}.norm_2", f"{h}.post_attention_layernorm")
    rows += weight_and_bias("blocks.{i}.attn.qkv", f"{h}.attention.query_key_value", qkv_per_head=True)
    rows += weight_and_bias("blocks.{i}.attn.proj", f"{h}.attention.dense")
    rows += weight_and_bias("blocks.{i}.mlp.fc", f"{h}.mlp.dense_h_to_4h")
    rows += weight_and_bias("blocks.{i}.mlp.proj", f"{h}.mlp.dense_4h_to_h")
    rows += weight_and_bias("norm_f", "gpt_neox.final_layer_norm")
    return tuple(rows + [WeightRow("lm_head.weight", ("embed_out.weight",))])


CONFIG = (
    *keys(vocab_size="vocab_size", context_length=("max_position_embeddings", 2048), n_layer="num_hidden_layers",
          n_head="num_attention_heads", n_embd="hidden_size", intermediate_size="intermediate_size",
          norm_eps=("layer_norm_eps", 1e-5), parallel_residual=("use_parallel_residual", True),
          tie_embeddings=("tie_word_embeddings", False)),
    Key("activation", "hidden_act", "gelu", values=ACTIVATIONS),
    Key(("qkv_bias", "attn_out_bias"), "attention_bias", True),
    *fixed(positions="rotary"),
    Rope(theta_key="rotary_emb_base", fraction_key="rotary_pct"),
)



def _gguf_hparams(w, c) -> None:
    w.add_parallel_residual(c.parallel_residual)  # llama.cpp requires the key, sequential models included


# llama.cpp's gptneox (src/models/gptneox.cpp): one attn_qkv whose rows are [q; k; v] by whole heads (views at
# offsets 0, n_embd, 2 n_embd), which is our fused layout, not HF's per-head interleave; NeoX-style rotary over
# the first rope.dimension_count dims; x + attn(ln1(x)) + mlp(ln2(x)) under use_parallel_residual; GELU in
# its tanh form (Pythia's exact erf is approximated); every bias and output.weight are required
GGUF = GGUFSpec("gptneox", tuple(
    [("wte.weight", ("token_embd.weight",))]
    + gguf_fused_block_rows()),
    requires=(("activation", ("gelu", "gelu_new")),), head_required=True, biases_required=True,
    hparams=_gguf_hparams)

FAMILIES = [Family("gpt_neox", causal_lm="GPTNeoXForCausalLM", sequence_classifier="GPTNeoXForSequenceClassification",
                   weights=_weights(), config=CONFIG, gguf=GGUF)]
