"""Shared fixtures: tiny random-weight HF models and a tokenizer trained on the embedded corpus.

Everything is built here, offline, in a few seconds: no weights or data come from a hub.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GPTLAB_CACHE", tempfile.mkdtemp(prefix="gptlab-test-cache-"))  # kernels build here
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pydoc_text(n_chars: int = 200_000) -> str:
    """Real English text every Python ships: the pydoc_data topics."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:n_chars]


def hf_config(model_type: str, **overrides):
    """A tiny transformers config of the given family (odd sizes are the caller's choice)."""
    import transformers as T

    base = {
        "gpt2": (T.GPT2Config, dict(n_layer=2, n_embd=48, n_head=3, vocab_size=101, n_positions=64)),
        "openai-gpt": (T.OpenAIGPTConfig, dict(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64)),
        "gpt_neo": (T.GPTNeoConfig, dict(num_layers=2, hidden_size=32, num_heads=4, vocab_size=100,
                                          max_position_embeddings=64, attention_types=[[["global", "local"], 1]],
                                          window_size=5)),
        "gptj": (T.GPTJConfig, dict(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64, rotary_dim=4)),
        "gpt_neox": (T.GPTNeoXConfig, dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=100,
                                            max_position_embeddings=64, intermediate_size=64, rotary_pct=0.25)),
        "qwen2": (T.Qwen2Config, dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=100, intermediate_size=64, max_position_embeddings=64)),
        "qwen3": (T.Qwen3Config, dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, vocab_size=100, intermediate_size=64, max_position_embeddings=64)),
        "qwen2_moe": (T.Qwen2MoeConfig, dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                              num_key_value_heads=2, vocab_size=100, intermediate_size=64,
                                              moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                              num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)),
        "qwen3_moe": (T.Qwen3MoeConfig, dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                              num_key_value_heads=2, head_dim=16, vocab_size=100, intermediate_size=64,
                                              moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                              max_position_embeddings=64)),
    }
    cls, kw = base[model_type]
    return cls(**{**kw, **overrides})


def make_hf_model(model_type: str = "gpt2", seed: int = 0, **overrides):
    """A random-weight transformers causal LM; weights are perturbed so no layer is an identity."""
    import transformers as T

    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(hf_config(model_type, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def save_hf_model(model, path: Path, tokenizer=None) -> Path:
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save(path)
    return path


@pytest.fixture(scope="session")
def corpus_text() -> str:
    return pydoc_text()


@pytest.fixture(scope="session")
def tiny_tokenizer(corpus_text):
    """A byte-level BPE with 512 ids trained on pydoc text (<|endoftext|> is id 0)."""
    from gptlab.tokenizer import train_tokenizer

    return train_tokenizer([corpus_text], vocab_size=512, show_progress=False)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """An HF-format GPT-2 dir (random weights, 2 layers, 48 wide, 3 heads) with the tiny tokenizer."""
    model = make_hf_model("gpt2", vocab_size=tiny_tokenizer.vocab_size, n_positions=128, bos_token_id=0, eos_token_id=0)
    return save_hf_model(model, tmp_path_factory.mktemp("tiny-gpt2"), tiny_tokenizer)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`): with 2 threads on
    busy cores, OpenMP barriers cost more than the math."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

