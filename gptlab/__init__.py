"""gptlab: one toolkit for the GPT family of decoder-only language models.

    import gptlab
    model = gptlab.load("path/to/hf-model-dir")          # or a hub id
    tok = gptlab.load_tokenizer("path/to/hf-model-dir")
    print(gptlab.generate(model, tok, "Hello", max_new_tokens=20))
"""

from gptlab.config import Config
from gptlab.errors import GptlabError
from gptlab.hf import load, save
from gptlab.model import GPT

__version__ = "0.1.0"


def load_tokenizer(path_or_id):
    from gptlab.tokenizer import load_tokenizer as _load

    return _load(path_or_id)
from gptlab.generate import generate  # after this, `gptlab.generate` is the function, not the module


__all__ = ["Config", "GPT", "GptlabError", "load", "save", "load_tokenizer", "generate", "__version__"]
