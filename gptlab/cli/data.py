"""`gptlab tokenizer train` (a byte-level BPE on a corpus) and `gptlab prepare` (a corpus -> token shards)."""

from __future__ import annotations

import sys
from pathlib import Path

from gptlab.cli import command
from gptlab.data.corpus import corpus_texts
from gptlab.data.shards import prepare
from gptlab.errors import GptlabError
from gptlab.tokenizer import train_tokenizer


@command("tokenizer train")
def tokenizer_train(
    corpus: list[str],
    vocab_size: int = 8192,
    out: str = "tokenizer",
    text_field: str = "text",
    min_frequency: int = 2,
    quiet: bool = False,
) -> int:
    """Train a byte-level BPE tokenizer (GPT-2's scheme) and save tokenizer.json + tokenizer_config.json.

    Args:
        corpus: text files, folders of them, JSONL files, or python-docs (the embedded corpus)
        vocab_size: number of tokens, including 256 byte tokens and <|endoftext|>
        out: output dir (-o)
        text_field: the field holding the text in JSONL files
        min_frequency: a pair must occur this often to be merged
        quiet: no progress bar
    """
    tok = train_tokenizer(corpus_texts(corpus, text_field), vocab_size=vocab_size, min_frequency=min_frequency,
                          show_progress=not quiet and sys.stderr.isatty())
    tok.save(Path(out))
    if not quiet:
        print(f"saved a {tok.vocab_size}-token tokenizer to {out}")
    return 0


@command("prepare")
def prepare_command(
    corpus: list[str],
    tokenizer: str = "",
    out: str = "",
    val_fraction: float = 0.01,
    text_field: str = "text",
    quiet: bool = False,
) -> int:
    """Tokenize a corpus into token shards (uint16/uint32 memmaps) with a held-out validation split.

    Args:
        corpus: text files, folders of them, JSONL files, or python-docs (the embedded corpus)
        tokenizer: a tokenizer dir (tokenizer.json), e.g. from `gptlab tokenizer train`, or an HF model dir
        out: output data dir (-o); default: data/<corpus name>
        val_fraction: share of the text held out for validation
        text_field: the field holding the text in JSONL files
        quiet: no progress bar
    """
    if not tokenizer:
        raise GptlabError("pass --tokenizer DIR (make one with `gptlab tokenizer train CORPUS --out DIR`)")
    dest = Path(out or Path("data") / Path(corpus[0]).name)
    manifest = prepare(corpus, tokenizer, dest, val_fraction=val_fraction, text_field=text_field,
                       show_progress=not quiet)
    s = manifest["splits"]
    print(f"{dest}: {s['train']['tokens']:,} train + {s['val']['tokens']:,} val tokens ({manifest['dtype']}), "
          f"{manifest['bytes_per_token']:.2f} bytes per token")
    return 0
