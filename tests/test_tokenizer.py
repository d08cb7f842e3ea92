"""The tokenizer: any UTF-8 text round-trips, GPT-2's original vocab.json + merges.txt files load."""

from __future__ import annotations


def test_chinese_text_round_trips_through_the_tokenizer(tiny_tokenizer):
    text = "深度学习模型：GPT-2 有 1.24 亿参数。\n换行 and English 混合 🙂"
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_gpt2_vocab_and_merges_files_load(tmp_path, tiny_tokenizer):
    """GPT-2's original tokenizer files (vocab.json + merges.txt) load and encode like tokenizer.json."""
    import json

    from gptlab.tokenizer import load_tokenizer

    model = json.loads(tiny_tokenizer.backend.to_str())["model"]
    (tmp_path / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = load_tokenizer(tmp_path)
    text = "The with statement is used to wrap a block. 中文"
    assert tok.encode(text) == tiny_tokenizer.encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id == tiny_tokenizer.eos_id
