"""`gptlab tokenizer train`: a byte-level BPE trained on a corpus (any UTF-8 text round-trips exactly)."""

from __future__ import annotations

import sys
from pathlib import Path

from gptlab.cli import command


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
    from gptlab.data import corpus_texts
    from gptlab.tokenizer import train_tokenizer

    tok = train_tokenizer(corpus_texts(corpus, text_field), vocab_size=vocab_size, min_frequency=min_frequency,
                          show_progress=not quiet and sys.stderr.isatty())
    tok.save(Path(out))
    if not quiet:
        print(f"saved a {tok.vocab_size}-token tokenizer to {out}")
    return 0
