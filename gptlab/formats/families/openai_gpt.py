"""GPT-1 (Radford et al. 2018): post-norm blocks (x = norm(x + f(x))), no final norm, learned positions."""

from gptlab.formats.families.gpt2 import gpt2_weights
from gptlab.formats.family import Family, Key, fixed, keys

# GPT-1's "gelu" is the tanh approximation (transformers' modeling_openai.ACT_FNS)
_AFN = {"gelu": "gelu_new", "relu": "relu", "silu": "silu", "swish": "silu"}

CONFIG = (
    *keys(vocab_size="vocab_size", context_length=("n_positions", 512), n_layer="n_layer", n_head="n_head",
          n_embd="n_embd", norm_eps=("layer_norm_epsilon", 1e-5), tie_embeddings=("tie_word_embeddings", True)),
    Key("activation", "afn", "gelu_new", values=_AFN),
    *fixed(post_norm=True, final_norm=False),
)

FAMILIES = [Family("openai-gpt", causal_lm="OpenAIGPTLMHeadModel", sequence_classifier="OpenAIGPTForSequenceClassification",
                   weights=gpt2_weights("tokens_embed", "positions_embed", final_norm=False), config=CONFIG)]
