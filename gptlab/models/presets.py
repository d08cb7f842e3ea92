"""Named presets: name -> Config fields, read by `Config.from_name(name)`; `gptlab models` prints them.

Each entry with an `hf_repo` holds exactly the fields `gptlab.formats.hfconfig.config_from_hf` reads from that repo's
config.json (sizes, biases, tied head, rope_theta, head_dim, norm eps, special token ids), so
`Config.from_name("qwen3-0.6b")` builds the same model `gptlab.load("Qwen/Qwen3-0.6B")` does. Fields left
out take Config's defaults, which are GPT-2's. tests/models/test_presets.py builds every entry and checks its
parameter count against the published figure.

Where a family has base and post-trained repos with the same architecture, the preset names the one
listed below; the other differs only in special-token ids or context length (e.g. Qwen2.5-*-Instruct
has eos 151645 and a 32768 context).
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {}
FAMILIES: dict[str, str] = {}  # preset name -> family label (`gptlab models --family`)


def _add(name: str, family: str, **fields: Any) -> None:
    PRESETS[name] = fields
    FAMILIES[name] = family


# ---------------------------------------------------------------------------------------------------------
# GPT-1 (Radford et al. 2018): post-norm blocks, no final norm, 40478-token BPE, 512 context.
# openai-community/openai-gpt config.json: afn "gelu" (the tanh form in transformers), no token ids.

_add("openai-gpt", "gpt1", hf_repo="openai-community/openai-gpt", model_type="openai-gpt", vocab_size=40478,
     context_length=512, n_layer=12, n_head=12, n_embd=768, post_norm=True, final_norm=False, activation="gelu_new")

# ---------------------------------------------------------------------------------------------------------
# GPT-2 (Radford et al. 2019): pre-norm, learned positions, tied head, 50257 vocab, 1024 context.

for _name, _layers, _width, _heads in (
    ("gpt2", 12, 768, 12), ("gpt2-medium", 24, 1024, 16), ("gpt2-large", 36, 1280, 20), ("gpt2-xl", 48, 1600, 25),
):
    _add(_name, "gpt2", hf_repo=f"openai-community/{_name}", model_type="gpt2", vocab_size=50257, context_length=1024,
         n_layer=_layers, n_head=_heads, n_embd=_width, bos_token_id=50256, eos_token_id=50256)

# ---------------------------------------------------------------------------------------------------------
# GPT-3 (Brown et al. 2020, Table 2.1): architecture-only presets, no published weights.
# GPT-3 is GPT-2's block with "alternating dense and locally banded sparse attention patterns" (sec. 2.1).
# The exact sparse pattern is not published; it is approximated here by local windows of 256 tokens on
# every other layer, as in EleutherAI's GPT-Neo replication, and the presets use GPT-Neo's model_type so
# they can be saved and loaded as HF checkpoints. That also takes GPT-Neo's conventions: no q/k/v biases
# and unscaled attention scores (the init scale absorbs the 1/sqrt(d) factor during training).
# Table 2.1 lists two shapes whose n_heads * d_head is not d_model: XL (24 x 128 for 2048) and 13B (40 x 128
# for 5140). Both keep d_head = 128 with n_heads * d_head = d_model here (XL: 16 heads, as GPT-Neo 1.3B;
# 13B: d_model 5120), since GPT-Neo ties the attention width to d_model; 24 heads of 128 would also make XL
# 1.5B, not the 1.3B the table names it.

for _name, _layers, _width, _heads in (
    ("gpt3-125m", 12, 768, 12),  # "GPT-3 Small", d_head 64
    ("gpt3-350m", 24, 1024, 16),  # "GPT-3 Medium", d_head 64
    ("gpt3-760m", 24, 1536, 16),  # "GPT-3 Large", d_head 96
    ("gpt3-1.3b", 24, 2048, 16),  # "GPT-3 XL", d_head 128 (Table 2.1 says 24 heads; see above)
    ("gpt3-2.7b", 32, 2560, 32),  # d_head 80
    ("gpt3-6.7b", 32, 4096, 32),  # d_head 128
    ("gpt3-13b", 40, 5120, 40),  # d_head 128 (Table 2.1 says d_model 5140; see above)
    ("gpt3-175b", 96, 12288, 96),  # "GPT-3", d_head 128
):
    _add(_name, "gpt3", model_type="gpt_neo", vocab_size=50257, context_length=2048, n_layer=_layers, n_head=_heads,
         n_embd=_width, qkv_bias=False, scale_attn=False, layer_windows=[0, 256] * (_layers // 2))

# ---------------------------------------------------------------------------------------------------------
# GPT-Neo (EleutherAI 2021): GPT-3-like, global and local (window 256) attention alternating, no q/k/v
# biases, no 1/sqrt(d) score scaling (config.json attention_types [[["global", "local"], n/2]]).

for _name, _repo, _layers, _width, _heads in (
    ("gpt-neo-125m", "EleutherAI/gpt-neo-125m", 12, 768, 12),
    ("gpt-neo-1.3b", "EleutherAI/gpt-neo-1.3B", 24, 2048, 16),
    ("gpt-neo-2.7b", "EleutherAI/gpt-neo-2.7B", 32, 2560, 20),
):
    _add(_name, "gpt-neo", hf_repo=_repo, model_type="gpt_neo", vocab_size=50257, context_length=2048, n_layer=_layers,
         n_head=_heads, n_embd=_width, qkv_bias=False, scale_attn=False, layer_windows=[0, 256] * (_layers // 2),
         bos_token_id=50256, eos_token_id=50256)

# ---------------------------------------------------------------------------------------------------------
# GPT-J-6B (Wang & Komatsuzaki 2021): parallel attention + MLP off one shared norm, interleaved rotary on
# 64 of 256 head dims, untied head with a bias, vocab padded to 50400.

_add("gpt-j-6b", "gpt-j", hf_repo="EleutherAI/gpt-j-6b", model_type="gptj", vocab_size=50400, context_length=2048,
     n_layer=28, n_head=16, n_embd=4096, positions="rotary", rotary_fraction=0.25, rotary_interleaved=True,
     parallel_residual=True, shared_norm=True, qkv_bias=False, attn_out_bias=False, tie_embeddings=False,
     lm_head_bias=True, bos_token_id=50256, eos_token_id=50256)

# ---------------------------------------------------------------------------------------------------------
# GPT-NeoX-20B and Pythia (Black et al. 2022; Biderman et al. 2023): parallel residual with two norms,
# rotary (half-split) on 25% of head dims, untied head, exact-erf GELU (Pythia config.json hidden_act
# "gelu"). GPT-NeoX-20B's config.json says "gelu_fast", which is the tanh approximation (= gelu_new).
# Vocab sizes are the tokenizer's 50277 ids padded for tensor parallelism: 50304, 50432, 50688.
# The -deduped Pythia repos have the same configs.


def _neox(repo: str, vocab: int, layers: int, width: int, heads: int, activation: str = "gelu") -> dict[str, Any]:
    return dict(hf_repo=repo, model_type="gpt_neox", vocab_size=vocab, context_length=2048, n_layer=layers,
                n_head=heads, n_embd=width, intermediate_size=4 * width, activation=activation, positions="rotary",
                rotary_fraction=0.25, parallel_residual=True, tie_embeddings=False, bos_token_id=0, eos_token_id=0)


_add("gpt-neox-20b", "gpt-neox", **_neox("EleutherAI/gpt-neox-20b", 50432, 44, 6144, 64, activation="gelu_new"))
for _size, _vocab, _layers, _width, _heads in (
    ("70m", 50304, 6, 512, 8), ("160m", 50304, 12, 768, 12), ("410m", 50304, 24, 1024, 16),
    ("1b", 50304, 16, 2048, 8), ("1.4b", 50304, 24, 2048, 16), ("2.8b", 50304, 32, 2560, 32),
    ("6.9b", 50432, 32, 4096, 32), ("12b", 50688, 36, 5120, 40),
):
    _add(f"pythia-{_size}", "pythia", **_neox(f"EleutherAI/pythia-{_size}", _vocab, _layers, _width, _heads))

# ---------------------------------------------------------------------------------------------------------
# Qwen2 (Qwen team 2024, arXiv 2407.10671) and Qwen2.5: RMSNorm, SwiGLU, GQA, rotary theta 1e6, q/k/v biases
# (no output bias), head tied for <= 3B. The base repos (bos = eos = <|endoftext|> 151643); sliding window
# off in every config.json. Qwen2-MoE (Qwen2-57B-A14B, Qwen1.5-MoE-A2.7B): every MLP is routed SwiGLU experts
# (top-k weights not renormalised) plus a shared expert behind a sigmoid gate; config.json's
# intermediate_size is unused there.


def _qwen2(repo: str, vocab: int, ctx: int, layers: int, width: int, heads: int, kv: int, ffn: int,
           eps: float, tie: bool, **moe: Any) -> dict[str, Any]:
    return dict(hf_repo=f"Qwen/{repo}", model_type="qwen2_moe" if moe else "qwen2", vocab_size=vocab,
                context_length=ctx, n_layer=layers, n_head=heads, n_kv_head=kv, n_embd=width, intermediate_size=ffn,
                norm="rmsnorm", norm_eps=eps, positions="rotary", rope_theta=1000000.0, mlp="moe" if moe else "glu",
                activation="silu", mlp_bias=False, attn_out_bias=False, tie_embeddings=tie, bos_token_id=151643,
                eos_token_id=151643, **moe)


for _size, _vocab, _layers, _width, _heads, _kv, _ffn, _eps, _tie in (
    ("0.5B", 151936, 24, 896, 14, 2, 4864, 1e-6, True),
    ("1.5B", 151936, 28, 1536, 12, 2, 8960, 1e-6, True),
    ("7B", 152064, 28, 3584, 28, 4, 18944, 1e-6, False),
    ("72B", 152064, 80, 8192, 64, 8, 29568, 1e-5, False),
):
    _add(f"qwen2-{_size.lower()}", "qwen2",
         **_qwen2(f"Qwen2-{_size}", _vocab, 131072, _layers, _width, _heads, _kv, _ffn, _eps, _tie))

_add("qwen2-57b-a14b", "qwen2-moe", **_qwen2("Qwen2-57B-A14B", 151936, 131072, 28, 3584, 28, 4, 18944, 1e-6, False,
                                             n_expert=64, n_expert_per_token=8, moe_intermediate_size=2560,
                                             shared_expert_intermediate_size=20480))
_add("qwen1.5-moe-a2.7b", "qwen2-moe", **_qwen2("Qwen1.5-MoE-A2.7B", 151936, 8192, 24, 2048, 16, 16, 5632, 1e-6,
                                                False, n_expert=60, n_expert_per_token=4, moe_intermediate_size=1408,
                                                shared_expert_intermediate_size=5632))

for _size, _vocab, _ctx, _layers, _width, _heads, _kv, _ffn, _eps, _tie in (
    ("0.5B", 151936, 32768, 24, 896, 14, 2, 4864, 1e-6, True),
    ("1.5B", 151936, 131072, 28, 1536, 12, 2, 8960, 1e-6, True),
    ("3B", 151936, 32768, 36, 2048, 16, 2, 11008, 1e-6, True),
    ("7B", 152064, 131072, 28, 3584, 28, 4, 18944, 1e-6, False),
    ("14B", 152064, 131072, 48, 5120, 40, 8, 13824, 1e-5, False),
    ("32B", 152064, 131072, 64, 5120, 40, 8, 27648, 1e-5, False),
    ("72B", 152064, 131072, 80, 8192, 64, 8, 29568, 1e-5, False),
):
    _add(f"qwen2.5-{_size.lower()}", "qwen2.5",
         **_qwen2(f"Qwen2.5-{_size}", _vocab, _ctx, _layers, _width, _heads, _kv, _ffn, _eps, _tie))

# ---------------------------------------------------------------------------------------------------------
# Qwen3 (Qwen team 2025): Qwen2.5's block without q/k/v biases and with RMSNorm on q and k (qk_norm),
# head_dim 128 whatever the width, 40960 context. The post-trained repos (eos = <|im_end|> 151645); head
# tied for <= 4B. MoE: 128 routed SwiGLU experts, 8 per token, renormalised top-k, no shared expert.


def _qwen3(repo: str, layers: int, width: int, heads: int, kv: int, ffn: int, tie: bool, **moe: Any) -> dict[str, Any]:
    return dict(hf_repo=f"Qwen/{repo}", model_type="qwen3_moe" if moe else "qwen3", vocab_size=151936,
                context_length=40960, n_layer=layers, n_head=heads, n_kv_head=kv, n_embd=width, head_dim=128,
                intermediate_size=ffn, norm="rmsnorm", norm_eps=1e-6, positions="rotary", rope_theta=1000000.0,
                mlp="moe" if moe else "glu", activation="silu", mlp_bias=False, qkv_bias=False, attn_out_bias=False,
                qk_norm=True, tie_embeddings=tie, bos_token_id=151643, eos_token_id=151645, **moe)


for _size, _layers, _width, _heads, _kv, _ffn, _tie in (
    ("0.6B", 28, 1024, 16, 8, 3072, True), ("1.7B", 28, 2048, 16, 8, 6144, True),
    ("4B", 36, 2560, 32, 8, 9728, True), ("8B", 36, 4096, 32, 8, 12288, False),
    ("14B", 40, 5120, 40, 8, 17408, False), ("32B", 64, 5120, 64, 8, 25600, False),
):
    _add(f"qwen3-{_size.lower()}", "qwen3", **_qwen3(f"Qwen3-{_size}", _layers, _width, _heads, _kv, _ffn, _tie))

# intermediate_size is config.json's (unused: every layer is MoE, mlp_only_layers = [], decoder_sparse_step 1)
_add("qwen3-30b-a3b", "qwen3-moe", **_qwen3("Qwen3-30B-A3B", 48, 2048, 32, 4, 6144, False, n_expert=128,
                                            n_expert_per_token=8, moe_intermediate_size=768, norm_topk_prob=True))
_add("qwen3-235b-a22b", "qwen3-moe", **_qwen3("Qwen3-235B-A22B", 94, 4096, 64, 4, 12288, False, n_expert=128,
                                              n_expert_per_token=8, moe_intermediate_size=1536, norm_topk_prob=True))

