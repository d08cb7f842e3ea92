"""Corpora -> token shards: errors that name the file, dtype choice, the validation split, the manifest,
numbered batches, and a tokenizer trained here that round-trips its corpus (and Chinese) exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gptlab import cli
from gptlab.data.corpus import read_corpus
from gptlab.data.examples import ExampleBatches
from gptlab.data.shards import TokenWindows, prepare, read_manifest, token_dtype
from gptlab.errors import GptlabError


def _ids(data: Path, split: str) -> np.ndarray:
    m = read_manifest(data)
    return np.concatenate([np.fromfile(data / s["file"], dtype=m["dtype"]) for s in m["splits"][split]["shards"]])


@pytest.fixture
def text_corpus(tmp_path, corpus_text) -> Path:
    """A folder of three documents: two .txt (one in a subfolder) and a JSONL with two rows."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    third = len(corpus_text) // 3
    (root / "a.txt").write_text(corpus_text[:third], encoding="utf-8")
    (root / "sub" / "b.md").write_text(corpus_text[third:2 * third], encoding="utf-8")
    rows = [{"text": corpus_text[2 * third:2 * third + 5000], "id": 1}, {"text": "中文文本：你好，世界。", "id": 2}]
    (root / "c.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (root / "skip.bin").write_bytes(b"\xff\xfe not text")  # not a text suffix: ignored
    return root


def test_prepare_manifest_counts_and_splits(tmp_path, text_corpus, tiny_tokenizer):
    out = tmp_path / "data"
    manifest = prepare(text_corpus, tiny_tokenizer, out, val_fraction=0.05, shard_tokens=10_000, show_progress=False)
    assert manifest == read_manifest(out)
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == tiny_tokenizer.vocab_size
    texts = [p.read_text(encoding="utf-8") for p in (text_corpus / "a.txt", text_corpus / "sub" / "b.md")]
    texts += [json.loads(line)["text"] for line in (text_corpus / "c.jsonl").read_text(encoding="utf-8").splitlines()]
    total_bytes = sum(len(t.encode("utf-8")) for t in texts)
    eos = tiny_tokenizer.eos_id
    train, val = _ids(out, "train"), _ids(out, "val")
    s = manifest["splits"]
    # every byte of the corpus lands in exactly one split, and the shard files hold exactly the counted tokens
    assert s["train"]["bytes"] + s["val"]["bytes"] == manifest["bytes"] == total_bytes
    assert (len(train), len(val)) == (s["train"]["tokens"], s["val"]["tokens"])
    assert all((out / sh["file"]).stat().st_size == 2 * sh["tokens"] for sp in s.values() for sh in sp["shards"])
    assert len(s["train"]["shards"]) >= 2  # shard_tokens=10_000 forced a roll-over
    # decoding a split gives back text whose UTF-8 size is the split's byte count
    for ids, split in ((train, "train"), (val, "val")):
        text = tiny_tokenizer.decode([int(i) for i in ids if i != eos])
        assert len(text.encode("utf-8")) == s[split]["bytes"]
    # one end-of-text per document (4 documents), the held-out share near the requested one
    assert (train == eos).sum() + (val == eos).sum() == s["train"]["documents"] + s["val"]["documents"] == 4
    assert 0.03 < s["val"]["bytes"] / total_bytes < 0.07
    assert manifest["bytes_per_token"] == pytest.approx(total_bytes / (len(train) + len(val)))
    assert (out / "tokenizer" / "tokenizer.json").is_file()


def test_prepare_picks_uint32_when_the_vocab_does_not_fit_16_bits(tmp_path, tiny_tokenizer):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32

    class Wide:  # the tiny tokenizer, claiming a vocabulary too big for uint16
        vocab_size = 70_000
        eos_id = tiny_tokenizer.eos_id

        def encode_batch(self, texts):
            return [[i + 69_400 for i in ids] for ids in tiny_tokenizer.encode_batch(texts)]

        def save(self, path):
            tiny_tokenizer.save(path)

    src = tmp_path / "t.txt"
    src.write_text("def f(x):\n    return x\n" * 400)
    m = prepare(src, Wide(), tmp_path / "d", val_fraction=0.1, show_progress=False)
    assert m["dtype"] == "uint32"
    ids = np.concatenate([_ids(tmp_path / "d", "train"), _ids(tmp_path / "d", "val")])
    assert ids[ids != Wide.eos_id].min() >= 65_536  # ids above 16 bits survived intact
    assert (ids[:50] == np.array(Wide().encode_batch([src.read_text()[:2000]])[0][:50])).all()


@pytest.mark.parametrize("content, why", [(b"", "empty"), (b"  \n\n", "empty"), (b"ok\n\xff\xfe bad", "not UTF-8")])
def test_prepare_errors_name_the_file(tmp_path, tiny_tokenizer, content, why):
    bad = tmp_path / "bad file.txt"
    bad.write_bytes(content)
    with pytest.raises(GptlabError, match=why) as e:
        prepare(bad, tiny_tokenizer, tmp_path / "d", show_progress=False)
    assert str(bad) in str(e.value)
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".d.tmp-*"))  # nothing half-written


def test_jsonl_errors_name_file_and_line(tmp_path, tiny_tokenizer):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(GptlabError, match=rf"{f}:2: has no 'text' field"):
        list(read_corpus(f))
    f.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(GptlabError, match=rf"{f}:2: not valid JSON"):
        list(read_corpus(f))


def test_too_small_for_validation_is_an_error(tmp_path, tiny_tokenizer):
    f = tmp_path / "tiny.txt"
    f.write_text("hello world\n")
    with pytest.raises(GptlabError, match="too small"):
        prepare(f, tiny_tokenizer, tmp_path / "d", show_progress=False)


def test_prepare_cli_writes_a_data_dir(tmp_path, text_corpus, tiny_tokenizer, capsys):
    out, tok_dir = tmp_path / "data", tmp_path / "tok"
    tiny_tokenizer.save(tok_dir)
    assert cli.main(["prepare", str(text_corpus / "a.txt"), "--tokenizer", str(tok_dir), "--out", str(out),
                     "--quiet"]) == 0
    assert "train" in capsys.readouterr().out
    assert read_manifest(out)["splits"]["val"]["tokens"] > 0
    assert cli.main(["prepare", str(tmp_path / "missing.txt"), "--tokenizer", str(tok_dir)]) == 1
    assert "missing.txt" in capsys.readouterr().err


def test_token_windows_are_numbered_and_split_across_ranks(tmp_path, text_corpus, tiny_tokenizer):
    out = tmp_path / "data"
    prepare(text_corpus, tiny_tokenizer, out, val_fraction=0.05, shard_tokens=3_000, show_progress=False)
    one = TokenWindows(out, "train", seq_len=32, batch_size=4, seed=7)
    b = one.batch(5)
    assert b["input_ids"].shape == b["labels"].shape == (4, 32)
    assert (b["input_ids"][:, 1:] == b["labels"][:, :-1]).all()  # labels are the next tokens
    assert (one.batch(5)["input_ids"] == b["input_ids"]).all()  # a batch depends only on its number
    assert not (one.batch(6)["input_ids"] == b["input_ids"]).all()
    # two processes with batch 2 read exactly the rows one process with batch 4 reads
    half = TokenWindows(out, "train", seq_len=32, batch_size=2, seed=7)
    for i in range(20):  # 20 batches over 3,000-token shards: some windows span two shards
        rows = [half.batch(i, rank=r, world=2)["input_ids"] for r in (0, 1)]
        assert (np.concatenate(rows) == one.batch(i)["input_ids"].numpy()).all()
    # windows equal the flat token stream at their offsets, across shard boundaries too
    flat = _ids(out, "train")
    for o in one.offsets(3, 0, 1):
        assert (one._window(o) == flat[o:o + 33]).all()
    # validation: consecutive windows, ranks taking turns
    val = TokenWindows(out, "val", seq_len=16, batch_size=2, shuffle=False)
    vflat = _ids(out, "val")
    assert (val.batch(0)["input_ids"].flatten().numpy() == vflat[:32]).all()
    assert (val.batch(0, rank=1, world=2)["input_ids"].flatten().numpy() == vflat[32:64]).all()


def test_example_batches_cover_each_epoch_once():
    examples = list(range(10))
    src = ExampleBatches(examples, batch_size=3, collate=lambda xs: {"x": np.array(xs)}, seed=1)
    seen = np.concatenate([src.batch(i)["x"] for i in range(10)])  # 30 = 3 epochs
    for epoch in range(3):
        assert sorted(seen[epoch * 10:(epoch + 1) * 10]) == examples
    two = [src.batch(i, rank=r, world=2)["x"] for i in range(5) for r in (0, 1)]
    assert (np.concatenate(two) == seen).all()


def test_tokenizer_trained_here_round_trips_its_corpus_and_chinese(tmp_path, capsys):
    out = tmp_path / "tok"
    assert cli.main(["tokenizer", "train", "python-docs", "--vocab-size", "512", "--out", str(out), "--quiet"]) == 0
    from gptlab.data.pydocs import documents
    from gptlab.tokenizer import load_tokenizer

    tok = load_tokenizer(out)
    assert tok.vocab_size == 512 and tok.eos_id is not None
    docs = list(documents())
    assert len(docs) > 400  # the pydoc topics plus one document per standard-library module
    text = "\n\n".join(docs)
    assert len(text) > 1_000_000
    assert tok.decode(tok.encode(text)) == text
    chinese = "机器学习是人工智能的一个分支。语言模型根据上文预测下一个词：「你好，世界！」🙂"
    assert tok.decode(tok.encode(chinese)) == chinese


def test_python_docs_corpus_is_deterministic_and_has_no_side_effects(capsys):
    from gptlab.data import pydocs as corpus

    import itertools

    first = list(itertools.islice(corpus.stdlib_docstrings(), 40))
    assert first == list(itertools.islice(corpus.stdlib_docstrings(), 40))
    assert first == list(corpus.documents())[len(list(corpus.topics())):][:40]
    assert capsys.readouterr().out == ""  # nothing was imported that prints (this, antigravity, ...)
    import sys

    assert "antigravity" not in sys.modules and "turtle" not in sys.modules


@pytest.mark.parametrize("damage, says", [("truncate", "truncated or replaced"), ("missing", "is missing"),
                                          ("edited", "does not match the checksum prepare wrote"),
                                          ("foreign", "outside the vocabulary")])
def test_damaged_shards_are_named_not_trained_on(tmp_path, tiny_tokenizer, damage, says):
    out = tmp_path / "data"
    prepare("python-docs", tiny_tokenizer, out, show_progress=False)
    shard = out / read_manifest(out)["splits"]["train"]["shards"][0]["file"]
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2 // 2 * 2])  # an even size: still whole tokens
    elif damage == "missing":
        shard.unlink()
    elif damage == "edited":  # same size, ids still in the vocabulary: only the checksum tells
        arr = np.frombuffer(data, dtype=np.uint16).copy()
        arr[10] = (int(arr[10]) + 1) % 512
        shard.write_bytes(arr.tobytes())
    else:  # an id past the vocabulary, in a manifest from before checksums
        arr = np.frombuffer(data, dtype=np.uint16).copy()
        arr[10] = 60000
        shard.write_bytes(arr.tobytes())
        manifest = json.loads((out / "manifest.json").read_text())
        for s in manifest["splits"]["train"]["shards"]:
            s.pop("sha256")
        (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(GptlabError, match=says):
        TokenWindows(out, "train", 32, 4)


def test_a_second_prepare_on_the_same_output_is_refused(tmp_path, tiny_tokenizer, corpus_text):
    import json
    import socket
    import subprocess
    import sys

    (tmp_path / "corpus.txt").write_text(corpus_text[:30_000])
    lock = tmp_path / ".data.gptlab.lock"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        with pytest.raises(GptlabError, match=rf"in use by another gptlab run \(pid {other.pid}.*choose another -o"):
            prepare(tmp_path / "corpus.txt", tiny_tokenizer, tmp_path / "data", val_fraction=0.05, show_progress=False)
        assert not (tmp_path / "data").exists()
    finally:
        other.kill()
        other.wait()
    prepare(tmp_path / "corpus.txt", tiny_tokenizer, tmp_path / "data", val_fraction=0.05, show_progress=False)
    assert (tmp_path / "data" / "manifest.json").is_file() and not lock.exists()
