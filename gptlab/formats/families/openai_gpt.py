"""GPT-1 (Radford et al. 2018): post-norm blocks (x = norm(x + f(x))), no final norm, learned positions."""

from gptlab.formats.families.gpt2 import gpt2_weights
from gptlab.formats.family import Family, Fixed, Key

# GPT-1's "gelu" is the tanh approximation (transformers' modeling_openai.ACT_FNS)
_AFN = {"gelu": "gelu_new", "relu": "relu", "silu": "silu", "swish": "silu"}

FAMILIES = [
    Family(
        model_type="openai-gpt",
        causal_lm="OpenAIGPTLMHeadModel",
        sequence_classifier="OpenAIGPTForSequenceClassification",
        weights=gpt2_weights("tokens_embed", "positions_embed", final_norm=False),
        config=(
            Key("vocab_size", "vocab_size"),
            Key("context_length", "n_positions", 512),
            Key("n_layer", "n_layer"),
            Key("n_head", "n_head"),
            Key("n_embd", "n_embd"),
            Key("norm_eps", "layer_norm_epsilon", 1e-5),
            Key("activation", "afn", "gelu_new", values=_AFN),
            Fixed("post_norm", True),
            Fixed("final_norm", False),
            Key("tie_embeddings", "tie_word_embeddings", True),
        ),
    ),
]
