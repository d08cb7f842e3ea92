"""Corpora -> token shards on disk, and the numbered windows the pretraining loop reads.

`gptlab prepare CORPUS --tokenizer T -o DATA` streams text through a tokenizer into:

    DATA/manifest.json        what is here: dtype, vocab, token / byte / document counts per split
    DATA/tokenizer/           a copy of the tokenizer, so the data dir is self-contained
    DATA/train-00000.bin ...  flat token ids (numpy memmap; uint16 when the vocab fits, else uint32),
    DATA/val-00000.bin ...    documents separated by the tokenizer's end-of-text id

A corpus is text files, folders of them (recursively, sorted), JSONL files with a text field, or the name
of the embedded corpus `python-docs` (read by gptlab/data/corpus.py). Text streams in pieces, so a corpus
larger than memory works. The validation split is a deterministic ~val_fraction of the pieces spread over the whole
corpus. Bytes per token (UTF-8 bytes of the text / tokens) let the trainer report bits per byte.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptlab.data import pydocs
from gptlab.data.corpus import corpus_fingerprint, corpus_texts, read_corpus
from gptlab.errors import GptlabError
from gptlab.limits import check
from gptlab.formats.files import RunLock, check_destination, read_json, replace_dir

FORMAT = "gptlab-tokens-1"
BATCH_CHARS = 1 << 20  # characters handed to the tokenizer per encode_batch call (it parallelises inside)


# ---------------------------------------------------------------------------------------------------------
# writing shards


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the disk and memory traffic whenever every id fits in it."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class _ShardWriter:
    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.root, self.split, self.dtype, self.shard_tokens = root, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.tokens = self.bytes = self.documents = 0
        self._f = None

    def write(self, ids: list[int], n_bytes: int, ends_doc: bool) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        while arr.size:
            if self._f is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._open()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, arr = arr[:room], arr[room:]
            raw = part.tobytes()
            self._f.write(raw)
            self._hash.update(raw)
            self.shards[-1]["tokens"] += int(part.size)
        self.tokens += len(ids)
        self.bytes += n_bytes
        self.documents += int(ends_doc)

    def _open(self) -> None:
        self._finish()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._f = open(self.root / name, "wb")
        self._hash = hashlib.sha256()
        self.shards.append({"file": name, "tokens": 0})

    def _finish(self) -> None:
        if self._f is not None:
            self._f.close()
            self.shards[-1]["sha256"] = self._hash.hexdigest()  # checked when a run opens the shard
            self._f = None

    def close(self) -> dict[str, Any]:
        self._finish()
        return {"tokens": self.tokens, "bytes": self.bytes, "documents": self.documents, "shards": self.shards}


def prepare(
    corpus: str | Path | Iterable[str | Path],
    tokenizer,
    out: str | Path,
    val_fraction: float = 0.01,
    text_field: str = "text",
    shard_tokens: int = 1 << 27,
    show_progress: bool = True,
    tokenizer_source: str | None = None,
    cleaner=None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tokenize a corpus into DATA (see the module docstring); returns the manifest. Replaces DATA atomically.

    tokenizer: a gptlab Tokenizer, or the path of a tokenizer dir.
    cleaner: a gptlab.data.quality.Cleaner: whole documents go through it first; the ones it removes are
    listed in DATA/removed.jsonl and counted in the manifest's "quality".
    """
    check_destination(out, ("manifest.json",), "the data dir", overwrite)
    from tqdm.auto import tqdm

    from gptlab.tokenizer import load_tokenizer

    if isinstance(tokenizer, (str, Path)):
        tokenizer_source = tokenizer_source or str(tokenizer)
        tokenizer = load_tokenizer(tokenizer)
    check("prepare_val_fraction", val_fraction)
    eos = tokenizer.eos_id
    if eos is None:
        raise GptlabError("the tokenizer has no end-of-text token to separate documents")
    vocab = tokenizer.vocab_size
    dtype = token_dtype(vocab)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out, lock_file=out.parent / f".{out.name}.gptlab.lock", option="-o")  # one prepare per dir
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
        seen = 0  # bytes so far, over both splits
        bar = tqdm(desc="prepare", unit="B", unit_scale=True, disable=not show_progress or not sys.stderr.isatty())

        def flush(batch: list[tuple[str, bool]]) -> None:
            nonlocal seen
            encoded = tokenizer.encode_batch([p for p, _ in batch])
            for (piece, ends), ids in zip(batch, encoded):
                n_bytes = len(piece.encode("utf-8"))
                if ends:
                    ids = ids + [eos]
                # a piece goes to validation while validation is behind its share of the bytes so far;
                # deterministic, and spread evenly over the corpus
                to_val = writers["val"].bytes + n_bytes / 2 <= val_fraction * (seen + n_bytes)
                writers["val" if to_val else "train"].write(ids, n_bytes, ends)
                seen += n_bytes
                bar.update(n_bytes)

        batch: list[tuple[str, bool]] = []
        size = 0
        removed = None if cleaner is None else open(tmp / "removed.jsonl", "w", encoding="utf-8")
        source = read_corpus(corpus, text_field) if cleaner is None else _cleaned(corpus, text_field, cleaner, removed)
        for piece, ends in source:
            batch.append((piece, ends))
            size += len(piece)
            if size >= BATCH_CHARS:
                flush(batch)
                batch, size = [], 0
        flush(batch)
        bar.close()
        if removed is not None:
            removed.close()
        splits = {s: w.close() for s, w in writers.items()}
        name = ", ".join(map(str, [corpus] if isinstance(corpus, (str, Path)) else corpus))
        if splits["train"]["bytes"] == 0:
            raise GptlabError(f"corpus {name} is empty")
        if splits["val"]["tokens"] < 2:
            raise GptlabError(f"corpus {name} is too small to hold out a validation split "
                              f"({splits['train']['bytes']} bytes at val_fraction={val_fraction})")
        tokenizer.save(tmp / "tokenizer")
        total_tokens = splits["train"]["tokens"] + splits["val"]["tokens"]
        total_bytes = splits["train"]["bytes"] + splits["val"]["bytes"]
        manifest = {
            "format": FORMAT,
            "corpus": name,
            "fingerprint": corpus_fingerprint(corpus),
            "tokenizer": "tokenizer",
            "tokenizer_source": tokenizer_source,
            "vocab_size": vocab,
            "eos_id": eos,
            "dtype": dtype.name,
            "val_fraction": val_fraction,
            "tokens": total_tokens,
            "bytes": total_bytes,
            "bytes_per_token": total_bytes / max(1, total_tokens),
            "splits": splits,
        }
        if cleaner is not None:
            manifest["quality"] = cleaner.summary()
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        lock.release()
    return manifest


def _cleaned(corpus, text_field: str, cleaner, removed) -> Iterator[tuple[str, bool]]:
    """The kept documents as (piece, ends_document); each removed one a line of removed.jsonl."""
    from gptlab.data.corpus import _pieces
    from gptlab.data.quality import read_documents

    for doc in read_documents(corpus, text_field):
        row = cleaner.check(doc)
        if row is not None:
            removed.write(json.dumps(row, ensure_ascii=False) + "\n")
            continue
        pieces = list(_pieces(doc.text))
        for i, piece in enumerate(pieces):
            yield piece, i == len(pieces) - 1


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise GptlabError(f"{data_dir} is not a prepared data dir (no manifest.json); run `gptlab prepare` first")
    manifest = read_json(path)
    if manifest.get("format") != FORMAT:
        raise GptlabError(f"{path} has format {manifest.get('format')!r}; expected {FORMAT!r}")
    return manifest


def ensure_prepared(
    data: str,
    tokenizer: str | None,
    vocab_size: int,
    cache: str | Path,
    val_fraction: float = 0.01,
    quiet: bool = False,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """A prepared data dir for `data`: itself when it already is one, else a cached preparation of the corpus.

    With no tokenizer given, a byte-level BPE of `vocab_size` is trained on the corpus (and cached too).
    In a distributed run only the main process prepares; the others wait at `barrier`.
    """
    p = Path(data).expanduser()
    if (p / "manifest.json").is_file():
        return p
    if str(data) != pydocs.NAME and not p.exists():
        raise GptlabError(f"data {data!r} is neither a prepared data dir, a corpus path, nor 'python-docs'")
    stem = pydocs.NAME if str(data) == pydocs.NAME else p.resolve().name
    fp = corpus_fingerprint(data)
    tok_key = f"bpe{vocab_size}" if tokenizer is None else "tok-" + hashlib.sha256(
        str(Path(tokenizer).resolve()).encode()).hexdigest()[:8]
    out = Path(cache).expanduser() / f"{stem}-{tok_key}-{fp[:8]}-val{val_fraction:g}"
    if is_main and not (out / "manifest.json").is_file():
        say = (lambda s: None) if quiet else (lambda s: print(s, flush=True))
        if tokenizer is None:
            from gptlab.tokenizer import train_tokenizer

            say(f"training a {vocab_size}-token byte-level BPE on {data} ...")
            tok = train_tokenizer(corpus_texts(data), vocab_size=vocab_size, show_progress=False)
            source = f"trained on {data} (vocab {vocab_size})"
        else:
            from gptlab.tokenizer import load_tokenizer

            tok, source = load_tokenizer(tokenizer), str(tokenizer)
        say(f"tokenizing {data} into {out} ...")
        prepare(data, tok, out, val_fraction=val_fraction, show_progress=not quiet, tokenizer_source=source)
    barrier()
    return out


# ---------------------------------------------------------------------------------------------------------
# reading shards: numbered batches


def _open_shard(data: Path, shard: dict[str, Any], dtype: np.dtype, vocab: int | None) -> np.memmap:
    """A shard as a memmap, checked against the manifest: present, exactly its token count long, and no id
    outside the vocabulary (a truncated or foreign file is an error, never a shorter or wrong dataset)."""
    path = data / shard["file"]
    if not path.is_file():
        raise GptlabError(f"{path} is missing (the manifest lists it); prepare the data again")
    expected = int(shard["tokens"]) * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise GptlabError(f"{path} is {size:,} bytes but the manifest says {shard['tokens']:,} tokens "
                          f"({expected:,} bytes): truncated or replaced; prepare the data again")
    m = np.memmap(path, dtype=dtype, mode="r")
    if "sha256" in shard and m.size and hashlib.sha256(memoryview(m)).hexdigest() != shard["sha256"]:
        raise GptlabError(f"{path} does not match the checksum prepare wrote in the manifest (changed since); "
                          f"prepare the data again")
    if vocab is not None and m.size and int(m.max()) >= int(vocab):
        raise GptlabError(f"{path} holds token id {int(m.max())}, outside the vocabulary of {vocab}; prepare the "
                          f"data again")
    return m


class TokenWindows:
    """Windows of seq_len + 1 tokens from one split, as numbered batches {"input_ids", "labels"} (B, T).

    shuffle=True (training): batch `index` holds batch_size * world windows at offsets drawn from a generator
    seeded by (seed, index); process `rank` takes rows [rank * batch_size, (rank + 1) * batch_size). So the
    data a step reads depends only on its number: resuming needs no saved position, and N processes with
    batch_size B read exactly the rows one process with batch_size N * B would.
    shuffle=False (validation): consecutive non-overlapping windows, batch `index` of rank `rank` continuing
    where the previous one ended; len() is the number of full batches for one process.
    """

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, batch_size: int, seed: int = 0,
                 shuffle: bool = True) -> None:
        self.dir = Path(data_dir)
        manifest = read_manifest(self.dir)
        if split not in manifest["splits"]:
            raise GptlabError(f"{data_dir} has no {split!r} split")
        dtype = np.dtype(manifest["dtype"])
        self.shards = [_open_shard(self.dir, s, dtype, manifest.get("vocab_size"))
                       for s in manifest["splits"][split]["shards"] if s["tokens"]]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.n_tokens = int(self.starts[-1])
        self.seq_len, self.batch_size, self.seed, self.shuffle = seq_len, batch_size, seed, shuffle
        self.split = split
        if self.n_tokens < seq_len + 1:
            raise GptlabError(f"the {split} split of {data_dir} has {self.n_tokens} tokens, fewer than one "
                              f"sequence of {seq_len + 1}; use a shorter seq_len or more data")

    def __len__(self) -> int:
        return max(1, (self.n_tokens - 1) // self.seq_len // self.batch_size)

    def _window(self, offset: int) -> np.ndarray:
        """seq_len + 1 tokens starting at a global offset (a window may span two shards)."""
        n = self.seq_len + 1
        k = int(np.searchsorted(self.starts, offset, side="right")) - 1
        local = offset - int(self.starts[k])
        out = np.asarray(self.shards[k][local:local + n], dtype=np.int64)
        while out.size < n:  # continue into the next shard
            k += 1
            out = np.concatenate([out, np.asarray(self.shards[k][: n - out.size], dtype=np.int64)])
        return out

    def offsets(self, index: int, rank: int, world: int) -> list[int]:
        B, T = self.batch_size, self.seq_len
        if self.shuffle:
            rng = np.random.default_rng([self.seed, index])
            all_rows = rng.integers(0, self.n_tokens - T, size=B * world)  # end exclusive: a full window fits
            return [int(o) for o in all_rows[rank * B:(rank + 1) * B]]
        n_windows = (self.n_tokens - 1) // T
        first = (index * world + rank) * B
        return [((first + j) % n_windows) * T for j in range(B)]

    def batch(self, index: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        rows = np.stack([self._window(o) for o in self.offsets(index, rank, world)])  # (B, T + 1)
        t = torch.from_numpy(rows)
        return {"input_ids": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous()}
