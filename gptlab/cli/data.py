"""`gptlab tokenizer train` (a byte-level BPE on a corpus) and `gptlab prepare` (a corpus -> token shards)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from gptlab.cli import command
from gptlab.data.corpus import corpus_texts
from gptlab.data.shards import prepare
from gptlab.errors import GptlabError
from gptlab.formats.files import check_destination
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
    check_destination(out, ("tokenizer.json", "tokenizer_config.json"), "the tokenizer dir")
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
    dedup: Literal["exact", "minhash"] | None = None,
    dedup_threshold: float = 0.7,
    num_perm: int = 128,
    filter: list[str] | None = None,
    overwrite: bool = False,
    quiet: bool = False,
) -> int:
    """Tokenize a corpus into token shards (uint16/uint32 memmaps) with a held-out validation split.

    With --dedup and/or --filter, whole documents are checked first; each one removed is listed in
    OUT/removed.jsonl (id, reason, the kept document it duplicates). docs/data.md has the rules.

    Args:
        corpus: text files, folders of them, JSONL files, or python-docs (the embedded corpus)
        tokenizer: a tokenizer dir (tokenizer.json), e.g. from `gptlab tokenizer train`, or an HF model dir
        out: output data dir (-o); default: data/<corpus name>
        val_fraction: share of the text held out for validation
        text_field: the field holding the text in JSONL files
        dedup: exact (normalised-text hash) or minhash (near-duplicates too)
        dedup_threshold: minhash: the estimated Jaccard similarity of word 2-grams that makes a duplicate
        num_perm: minhash: permutations per signature (more: finer estimates, slower)
        filter: quality rules: default, none, RULE, -RULE, RULE=VALUE (e.g. default -max_digit_ratio min_words=20)
        overwrite: replace OUT even when it holds files gptlab did not write
        quiet: no progress bar
    """
    from gptlab.data.quality import Cleaner, Deduper, parse_filters

    rules = parse_filters(filter or [])
    deduper = Deduper(dedup, dedup_threshold, num_perm) if dedup else None
    cleaner = Cleaner(deduper, rules) if deduper is not None or rules else None
    if not tokenizer:
        raise GptlabError("pass --tokenizer DIR (make one with `gptlab tokenizer train CORPUS --out DIR`)")
    dest = Path(out or Path("data") / Path(corpus[0]).name)
    manifest = prepare(corpus, tokenizer, dest, val_fraction=val_fraction, text_field=text_field,
                       show_progress=not quiet, cleaner=cleaner, overwrite=overwrite)
    s = manifest["splits"]
    print(f"{dest}: {s['train']['tokens']:,} train + {s['val']['tokens']:,} val tokens ({manifest['dtype']}), "
          f"{manifest['bytes_per_token']:.2f} bytes per token")
    if cleaner is not None:
        c = manifest["quality"]["counts"]
        why = ", ".join(f"{k} {v:,}" for k, v in sorted(c.items()) if k not in ("documents", "kept"))
        print(f"kept {c.get('kept', 0):,} of {c.get('documents', 0):,} documents"
              f"{'; removed: ' + why if why else ''} (listed in {dest / 'removed.jsonl'})")
    return 0


@command("contamination")
def contamination_command(
    train: str,
    eval: list[str],
    out: str = "",
    ngram: int = 13,
    max_train_docs: int = 10,
    text_field: str = "text",
    quiet: bool = False,
) -> int:
    """Find eval examples that overlap the training data (GPT-3's n-gram test) and split each eval file.

    Writes OUT/<name>.contaminated.jsonl (the rows, each with the n-gram it shares), OUT/<name>.clean.jsonl
    (evaluate on these) and OUT/report.json + report.md. docs/data.md has the method.

    Args:
        train: training data: text files, a folder, JSONL, python-docs, or a `gptlab prepare` data dir
        eval: eval files: JSONL rows (as `gptlab eval` reads them) or text files, one example per line
        out: output dir (-o); default: contamination/<first eval file's name>
        ngram: words per n-gram (examples shorter than this use their whole text)
        max_train_docs: n-grams in more training documents than this are common phrases and ignored
        text_field: the field holding the text in training JSONL files
        quiet: no progress bar
    """
    from gptlab.data.contamination import find_contamination

    dest = Path(out or Path("contamination") / Path(eval[0]).stem)
    check_destination(dest, ("report.json",), "the output dir")
    report = find_contamination(train, eval, dest, ngram=ngram, max_train_docs=max_train_docs,
                                text_field=text_field, show_progress=not quiet and sys.stderr.isatty())
    for f in report.files:
        print(f"{f['file']}: {f['contaminated']} of {f['examples']} examples contaminated "
              f"({100 * f['contaminated_fraction']:.1f}%), {f['clean']} clean -> {dest / (f['name'] + '.clean.jsonl')}")
    print(f"report: {dest / 'report.md'}")
    return 0
