"""gptlab: one toolkit for the GPT family of decoder-only language models.

    import gptlab
    model = gptlab.load("path/to/hf-model-dir")          # or a hub id
    tok = gptlab.load_tokenizer("path/to/hf-model-dir")
    print(gptlab.generate(model, tok, "Hello", max_new_tokens=20))
    gptlab.save(model, "out/my-model", tokenizer=tok)

The package follows the data flow: data/ (text -> token shards), train/ (the one loop), models/ (Config and
the one Transformer), formats/ (HF model dirs, PEFT adapters), infer/ (generation), eval/; the command line
is cli/, which imports the library and is never imported by it. docs/architecture.md is the map.
"""

from gptlab.errors import GptlabError
from gptlab.formats.hf import load, save
from gptlab.infer.generate import generate
from gptlab.models.config import Config
from gptlab.models.model import GPT
from gptlab.tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = ["Config", "GPT", "GptlabError", "load", "save", "load_tokenizer", "generate", "__version__"]
