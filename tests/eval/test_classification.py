"""Classification by label scoring: the metrics' arithmetic, and the pipeline's consistency."""

from __future__ import annotations

import json

import pytest

import gptlab
from gptlab.errors import GptlabError
from gptlab.eval import evaluate
from gptlab.eval.metrics import classification_report, confusion_matrix


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def test_class_metrics_by_hand():
    # true:      a a b b c      confusion (rows true, cols pred): a [1 1 0]
    # predicted: a b b b a                                         b [0 2 0]
    #                                                              c [1 0 0]
    m = classification_report(confusion_matrix([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], 3), ["a", "b", "c"])
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]] and m["accuracy"] == pytest.approx(3 / 5)
    a, b, c = (m["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["f1"], a["support"]) == (0.5, 0.5, 0.5, 2)
    assert (b["precision"], b["recall"]) == (pytest.approx(2 / 3), 1.0) and b["f1"] == pytest.approx(0.8)
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 1)  # never predicted: 0, not NaN
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


@pytest.fixture(scope="module")
def model_and_tok(tiny_gpt2_dir):
    return gptlab.load(tiny_gpt2_dir), gptlab.load_tokenizer(tiny_gpt2_dir)


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pipeline_predicts_the_likeliest_label_and_metrics_agree(model_and_tok, corpus_text, tmp_path):
    model, tok = model_and_tok
    labels = ["syntax", "semantics", "library"]
    rows = [{"text": corpus_text[i * 200: i * 200 + 150], "label": labels[i % 3]} for i in range(12)]
    data = write(tmp_path / "cls.jsonl", rows)
    r = evaluate(model, "classification", data, tokenizer=tok, labels=labels, batch_size=5, progress=False)
    confusion = r.details["confusion"]
    assert r.details["labels"] == labels  # the given order, not sorted
    assert sum(map(sum, confusion)) == 12
    assert r.metrics["acc"] == pytest.approx(sum(confusion[i][i] for i in range(3)) / 12)
    for i, name in enumerate(labels):
        assert r.details["per_class"][name]["support"] == sum(confusion[i]) == 4
    for s in r.samples:
        lls = s["loglikelihoods"]
        assert s["pred"] == max(labels, key=lambda k: (lls[k], -labels.index(k)))
    # each label's score is its log-likelihood after the prompt, as the scorer computes it
    from gptlab.eval.scorer import Scorer

    expected = Scorer(model, tok, progress=False).loglikelihood([(rows[0]["text"] + "\nLabel:", " library")])[0][0]
    assert r.samples[0]["loglikelihoods"]["library"] == pytest.approx(expected, rel=1e-6)
    assert "true \\ pred" in r.table()


def test_labels_default_to_the_sorted_set_in_the_data(model_and_tok, tmp_path):
    model, tok = model_and_tok
    data = write(tmp_path / "cls.jsonl", [{"text": "a", "label": "zeta"}, {"text": "b", "label": "alpha"}])
    r = evaluate(model, "classification", data, tokenizer=tok, progress=False)
    assert r.details["labels"] == ["alpha", "zeta"]


def test_bad_rows_name_their_line(model_and_tok, tmp_path):
    model, tok = model_and_tok
    data = write(tmp_path / "cls.jsonl", [{"text": t, "label": label} for t, label in (("a", "x"), ("b", "y"), ("c", "w"))])
    with pytest.raises(GptlabError, match=r"cls.jsonl:3: label 'w' is not one of"):
        evaluate(model, "classification", data, tokenizer=tok, labels=["x", "y"], progress=False)
    data = write(tmp_path / "cls2.jsonl", [{"text": "a", "label": "x"}, {"body": "b", "label": "y"}])
    with pytest.raises(GptlabError, match=r"cls2.jsonl:2: the template uses field 'text'"):
        evaluate(model, "classification", data, tokenizer=tok, progress=False)
