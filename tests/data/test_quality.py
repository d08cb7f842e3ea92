"""Dedup and quality filters in `gptlab prepare`: planted exact and near-duplicates (5% of words changed,
inserted or dropped) of real documents are found with recall and precision >= 0.95, one of each pair kept;
each quality rule removes what it should and can be switched off; bad options are one clear error."""

from __future__ import annotations

import json
import random

import pytest

from gptlab import cli
from gptlab.data import pydocs
from gptlab.data.quality import Cleaner, Deduper, Document, lsh_bands, parse_filters, quality_failure
from gptlab.errors import GptlabError


def edit(text: str, rnd: random.Random, rate: float = 0.05) -> str:
    """~rate of the words replaced, doubled (an insertion) or dropped, a third each."""
    ws = text.split()
    vocab = sorted(set(ws))
    out = []
    for w in ws:
        r = rnd.random()
        if r < rate / 3:
            out.append(rnd.choice(vocab))
        elif r < 2 * rate / 3:
            out += [w, rnd.choice(vocab)]
        elif r >= rate:
            out.append(w)
    return " ".join(out)


@pytest.fixture(scope="module")
def originals():
    """Distinct documents of the embedded corpus (its own near-duplicates left out), 80+ words each."""
    docs = [Document(f"doc{i}", d) for i, d in enumerate(pydocs.documents()) if len(d.split()) >= 80]
    d = Deduper("minhash")
    return [doc for doc in docs if d.check(doc).keep][:300]


def test_planted_duplicates_are_found_and_originals_kept(tmp_path, tiny_tokenizer, originals):
    rnd = random.Random(0)
    near = {f"near{i}": doc.id for i, doc in enumerate(rnd.sample(originals, 80))}
    exact = {f"exact{i}": doc.id for i, doc in enumerate(rnd.sample(originals, 40))}
    by_id = {d.id: d.text for d in originals}
    rows = [{"id": d.id, "text": d.text} for d in originals]
    rows += [{"id": k, "text": edit(by_id[v], rnd)} for k, v in near.items()]
    rows += [{"id": k, "text": "  " + by_id[v].upper().replace(" ", "\n ")} for k, v in exact.items()]  # case, spaces
    rnd.shuffle(rows)
    order = {r["id"]: i for i, r in enumerate(rows)}
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tiny_tokenizer.save(tmp_path / "tok")
    assert cli.main(["prepare", str(corpus), "--tokenizer", str(tmp_path / "tok"), "-o", str(tmp_path / "data"),
                     "--dedup", "minhash", "--quiet"]) == 0
    removed = [json.loads(line) for line in (tmp_path / "data" / "removed.jsonl").read_text().splitlines()]
    planted = {**near, **exact}  # copy -> original
    group = {**planted, **{d.id: d.id for d in originals}}  # a document -> the original it copies (or is)
    # right: the removed document and the kept one it matched are copies of one original
    # (each planted copy makes one document too many in its group; the group's first one stays)
    found = [r for r in removed if group[r["duplicate_of"]] == group[r["id"]]]
    recall, precision = len(found) / len(planted), len(found) / max(len(removed), 1)
    assert recall >= 0.95 and precision >= 0.95, (recall, precision, removed[:5])
    kept = {r["id"] for r in rows} - {r["id"] for r in removed}
    assert {d.id for d in originals} <= {group[k] for k in kept}  # every original's text survives once
    for r in found:  # the one seen first is kept, whichever of the pair it is
        assert order[r["duplicate_of"]] < order[r["id"]]
        exact_pair = "near" not in r["id"] + r["duplicate_of"]
        assert r["reason"] == ("exact_duplicate" if exact_pair else "near_duplicate"), r
        assert 0.7 <= r["similarity"] <= 1.0
    q = json.loads((tmp_path / "data" / "manifest.json").read_text())["quality"]
    assert q["counts"]["documents"] == len(rows) and q["counts"]["kept"] == len(rows) - len(removed)
    assert q["dedup"] == "minhash" and q["num_perm"] == 128


def test_exact_mode_finds_only_exact_copies(originals):
    c = Cleaner(Deduper("exact"))
    rnd = random.Random(1)
    a = originals[0]
    assert c.check(a) is None
    assert c.check(Document("copy", a.text.lower()))["duplicate_of"] == a.id
    assert c.check(Document("edited", edit(a.text, rnd))) is None
    assert c.counts["exact_duplicate"] == 1 and c.counts["kept"] == 2


def test_cjk_near_duplicates(originals):
    rnd = random.Random(2)
    base = "".join(chr(0x4E00 + rnd.randrange(3000)) for _ in range(400))  # 400 CJK characters
    c = Cleaner(Deduper("minhash"))
    assert c.check(Document("zh", base)) is None
    chars = list(base)
    for i in rnd.sample(range(len(chars)), 20):  # 5% of the characters changed
        chars[i] = "字"
    assert c.check(Document("zh-near", "".join(chars)))["duplicate_of"] == "zh"
    assert c.check(Document("other", originals[1].text)) is None


def test_quality_rules_remove_what_they_name_and_switch_off():
    good = ("The with statement is used to wrap the execution of a block with methods defined by a context "
            "manager. This allows common try, except and finally usage patterns to be encapsulated for convenient "
            "reuse. The context expression is evaluated to obtain a context manager, whose enter method is loaded "
            "for later use, and whose exit method runs when the block ends, even after an exception was raised "
            "inside it, so files and locks are always released.")
    rules = parse_filters(["default"])
    assert quality_failure(good, rules) is None, quality_failure(good, rules)
    cases = {
        "min_words": "too short to keep",
        "max_digit_ratio": " ".join(f"{i:08d} value" for i in range(60)),
        "max_symbol_ratio": " ".join(f"# heading{i} text here" for i in range(60)),
        "max_duplicate_lines": "\n".join(["the same line again and again here"] * 30),
        "min_alpha_words": " ".join(["---", "***", "|||", "word"] * 30),
        "max_bullet_lines": "\n".join(f"- item number {i} of a long list of words" for i in range(30)),
    }
    for rule, text in cases.items():
        failed = quality_failure(text, rules)
        assert failed is not None, rule
        off = parse_filters(["default", f"-{rule}"])
        assert quality_failure(text, off) is None or not quality_failure(text, off).startswith(rule)
    assert quality_failure("短文本" * 100, parse_filters(["min_words=100"])) is None  # CJK characters count as words
    assert parse_filters(["default", "min_words=20"])["min_words"] == 20.0
    assert parse_filters(["default", "none"]) == {}


@pytest.mark.parametrize("spec, says", [(["bogus"], "unknown rule 'bogus'"), (["min_words=x"], "must be a number"),
                                        (["min_words=-1"], ">= 0")])
def test_bad_filter_specs(spec, says):
    with pytest.raises(GptlabError, match=says):
        parse_filters(spec)


def test_bad_options_are_one_line_errors(tmp_path, tiny_tokenizer, capsys):
    tiny_tokenizer.save(tmp_path / "tok")
    code = cli.main(["prepare", "python-docs", "--tokenizer", str(tmp_path / "tok"), "-o", str(tmp_path / "d"),
                     "--dedup", "minhash", "--dedup-threshold", "1.5"])
    err = capsys.readouterr().err
    assert code != 0 and "dedup-threshold must be a finite number in (0, 1]" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()


def test_lsh_bands_suit_the_threshold():
    b, r = lsh_bands(0.7, 128)
    assert b * r <= 128 and abs((1 / b) ** (1 / r) - 0.7) < 0.08  # the S-curve's midpoint near the threshold
