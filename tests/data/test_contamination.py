"""`gptlab contamination`: eval items planted in the training data (re-cased, re-punctuated, English and
Chinese) are found and none of the clean ones are; common phrases are ignored; the clean subset is written
for `gptlab eval`; a prepared data dir works as TRAIN; bad input is one clear error."""

from __future__ import annotations

import json
import random

import pytest

from gptlab import cli
from gptlab.data import pydocs
from gptlab.data.contamination import contamination_words, find_contamination
from gptlab.errors import GptlabError

COMMON = "permission is hereby granted free of charge to any person obtaining a copy of this software"


def _zh(rnd: random.Random, n: int) -> str:
    return "".join(chr(0x4E00 + rnd.randrange(3000)) for _ in range(n)) + "。"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("contamination")
    rnd = random.Random(0)
    docs = [d for d in pydocs.documents() if len(d.split()) > 60]
    train_docs, held_out = docs[:200], docs[200:260]
    items, leaked = [], set()
    for i in range(24):
        if i % 4 == 0:  # leaked English: a passage of a training document
            words = rnd.choice(train_docs).split()
            at = rnd.randrange(0, len(words) - 30)
            q = " ".join(words[at:at + 30])
            leaked.add(f"q{i}")
        elif i % 4 == 1:  # leaked Chinese: written into a training document below
            q = _zh(rnd, 40)
            leaked.add(f"q{i}")
        elif i % 4 == 2:  # clean: from text the training data does not hold
            words = rnd.choice(held_out).split()
            q = " ".join(words[:30])
        else:  # clean Chinese, and a common licence phrase that alone means nothing
            q = _zh(rnd, 40) + " " + COMMON
        items.append({"id": f"q{i}", "question": q, "choices": ["yes", "no"], "label": 0})
    train = [{"text": d} for d in train_docs]
    for it in items:
        if it["id"] in leaked and not it["question"].isascii():
            host = rnd.randrange(len(train))  # the leak, re-punctuated, inside a document
            train[host]["text"] += "\n\n题目：" + it["question"].replace("。", "！") + " 答案在此。"
    for k in range(30):  # the licence text in many documents: too common to count
        train[k]["text"] += "\n" + COMMON.upper() + "."
    for it in items:  # English leaks re-cased and with extra punctuation, as a web copy might be
        if it["id"] in leaked and it["question"].isascii():
            train[rnd.randrange(len(train))]["text"] += "\n" + it["question"].upper().replace(" ", ", ", 3)
    (root / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train),
                                      encoding="utf-8")
    (root / "mc.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items),
                                   encoding="utf-8")
    return root, items, leaked


def _ids(path):
    return {json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()}


def test_planted_items_are_found_and_clean_ones_are_not(setup, capsys):
    root, items, leaked = setup
    assert cli.main(["contamination", str(root / "train.jsonl"), str(root / "mc.jsonl"), "-o", str(root / "out"),
                     "--quiet"]) == 0
    assert f"{len(leaked)} of 24 examples contaminated" in capsys.readouterr().out
    found = _ids(root / "out" / "mc.contaminated.jsonl")
    assert found == leaked
    assert _ids(root / "out" / "mc.clean.jsonl") == {it["id"] for it in items} - leaked
    row = json.loads((root / "out" / "mc.contaminated.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert row["choices"] == ["yes", "no"] and len(row["contamination"]["ngram"].split()) == 13
    report = json.loads((root / "out" / "report.json").read_text(encoding="utf-8"))
    assert report["files"][0]["contaminated"] == len(leaked) and report["files"][0]["examples"] == len(items)
    assert "| " in (root / "out" / "report.md").read_text(encoding="utf-8")


def test_common_phrases_count_when_allowed(setup, tmp_path):
    root, items, leaked = setup
    r = find_contamination(root / "train.jsonl", [root / "mc.jsonl"], tmp_path, max_train_docs=100,
                           show_progress=False)
    assert r.files[0]["contaminated"] == len(leaked) + 6  # the licence phrase now counts


def test_a_prepared_data_dir_is_training_data(setup, tmp_path, tiny_tokenizer):
    root, items, leaked = setup
    tiny_tokenizer.save(tmp_path / "tok")
    assert cli.main(["prepare", str(root / "train.jsonl"), "--tokenizer", str(tmp_path / "tok"),
                     "-o", str(tmp_path / "data"), "--quiet"]) == 0
    find_contamination(tmp_path / "data", [root / "mc.jsonl"], tmp_path / "out", show_progress=False)
    assert _ids(tmp_path / "out" / "mc.contaminated.jsonl") == leaked


def test_normalisation_is_gpt3s():
    assert contamination_words("Hello,   WORLD!  It's 3.14\n日本語") == ["hello", "world", "it", "s", "3", "14",
                                                                      "日", "本", "語"]


def test_bad_input_is_one_clear_error(setup, tmp_path, capsys):
    root, _, _ = setup
    (tmp_path / "e.csv").write_text("a,b\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.txt").write_text("\n\n")
    cases = [([str(root / "train.jsonl"), str(tmp_path / "e.csv")], "not an eval file gptlab reads"),
             ([str(tmp_path / "blank.txt"), str(root / "mc.jsonl")], "no documents"),
             ([str(root / "train.jsonl"), str(tmp_path / "missing.jsonl")], "does not exist"),
             ([str(root / "train.jsonl"), str(root / "mc.jsonl"), "--ngram", "3"], "ngram must be an integer >= 8")]
    for args, says in cases:
        code = cli.main(["contamination", *args, "-o", str(tmp_path / "o"), "--quiet"])
        err = capsys.readouterr().err
        assert code != 0 and says in err and "Traceback" not in err, (args, err)
    with pytest.raises(GptlabError, match="holds no examples"):
        find_contamination(root / "train.jsonl", [tmp_path / "empty.jsonl"], tmp_path / "o", show_progress=False)
