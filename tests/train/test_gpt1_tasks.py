"""GPT-1's task fine-tuning (entailment, similarity, multiple choice): the input transformations, the task
tokens added to the vocabulary, learning clearly above chance on small synthetic sets, metrics equal to a
direct count, and the saved head in transformers."""

from __future__ import annotations

import json
import random

import pytest
import torch

from gptlab.data.gpt1_tasks import TOKENS, GroupCollate, load_task_rows, task_tokens
from gptlab.errors import GptlabError
from gptlab.tokenizer import load_tokenizer
from gptlab.train.finetune import FinetuneConfig, finetune
from tests.train.test_finetune import CLASSES, FILLER, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = sorted(CLASSES)


def _sentence(rng, thing: str) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
    words.insert(rng.randint(0, len(words)), thing)
    return " ".join(words)


def rows(task: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind, other = rng.sample(KINDS, 2)
        thing, unlike = rng.choice(CLASSES[kind]), rng.choice(CLASSES[other])
        if task == "entailment":  # is the thing the premise mentions of the kind the hypothesis names?
            yes = rng.random() < 0.5
            out.append({"premise": _sentence(rng, thing), "hypothesis": f"it is a {kind if yes else other}",
                        "label": "entailment" if yes else "contradiction"})
        elif task == "similarity":  # do both sentences mention the same thing?
            same = rng.random() < 0.5
            out.append({"sentence1": _sentence(rng, thing), "sentence2": _sentence(rng, thing if same else unlike),
                        "label": "same" if same else "different"})
        else:  # which choice is a thing of the asked kind?
            choices = [rng.choice(CLASSES[k]) for k in KINDS]  # one thing of each kind
            right = KINDS.index(kind)
            out.append({"context": f"which one is a {kind} ?", "choices": choices,
                        "label": right if rng.random() < 0.5 else choices[right]})
    return out


def config(tmp_path, task, **kw) -> FinetuneConfig:
    train = write_jsonl(tmp_path / f"{task}-train.jsonl", rows(task, 1000, seed=0))
    val = write_jsonl(tmp_path / f"{task}-val.jsonl", rows(task, 60, seed=1))
    base = dict(data=str(train), val_data=str(val), task=task, method="full", out_dir=str(tmp_path / task),
                precision="fp32", quiet=True, warmup_steps=5, batch_size=16, max_steps=600, lr=3e-3, min_lr=3e-4,
                eval_every=300, log_every=1000)
    return FinetuneConfig(**{**base, **kw})


def test_inputs_are_transformed_as_in_the_paper(tiny_gpt2_dir, tmp_path):
    tok = load_tokenizer(tiny_gpt2_dir)
    before = tok.vocab_size
    tokens, added = task_tokens(tok)
    assert added == 3 and tok.vocab_size == before + 3
    assert task_tokens(tok) == (tokens, 0)  # already there: nothing added twice
    f = write_jsonl(tmp_path / "s.jsonl", [{"sentence1": "a cat", "sentence2": "the dog", "label": "same"},
                                           {"sentence1": "x", "sentence2": "y", "label": "different"}])
    got = load_task_rows(f, "similarity", tok, tokens, seq_len=64)
    (a_b, b_a), label = got.examples[0]
    a, b = tok.encode("a cat"), tok.encode("the dog")
    assert a_b == [tokens.start, *a, tokens.delim, *b, tokens.extract]
    assert b_a == [tokens.start, *b, tokens.delim, *a, tokens.extract]
    assert got.names == ["different", "same"] and label == 1

    c = write_jsonl(tmp_path / "c.jsonl", [{"context": "pick", "choices": ["one", "two", "three"], "label": "two"}])
    (seqs, label), = load_task_rows(c, "choice", tok, tokens, seq_len=64).examples
    assert len(seqs) == 3 and label == 1 and all(s[-1] == tokens.extract for s in seqs)
    batch = GroupCollate(0)([(seqs, label)])
    assert batch["input_ids"].shape[0] == 3 and batch["labels"].tolist() == [1]
    # lm labels: each token's next one, nothing past a sequence's end
    s = seqs[0]
    assert batch["lm_labels"][0, : len(s) - 1].tolist() == s[1:]
    assert (batch["lm_labels"][0, len(s) - 1:] == -100).all()


def test_long_texts_keep_the_markers_and_the_end_of_the_first_text(tiny_gpt2_dir, tmp_path):
    tok = load_tokenizer(tiny_gpt2_dir)
    tokens, _ = task_tokens(tok)
    premise = " ".join(f"w{i}" for i in range(200))
    f = write_jsonl(tmp_path / "e.jsonl", [{"premise": premise, "hypothesis": "short one", "label": "x"},
                                           {"premise": "p", "hypothesis": "h", "label": "y"}])
    got = load_task_rows(f, "entailment", tok, tokens, seq_len=32)
    (seq,), _ = got.examples[0]
    assert len(seq) == 32 and seq[0] == tokens.start and seq[-1] == tokens.extract and got.truncated == 1
    hyp = tok.encode("short one")
    assert seq[-1 - len(hyp):-1] == hyp and seq[-2 - len(hyp)] == tokens.delim
    assert seq[1:-2 - len(hyp)] == tok.encode(premise)[-(32 - 3 - len(hyp)):]


@pytest.mark.parametrize("row, message", [
    ({"premise": "p", "label": "a"}, "field 'hypothesis' must be a non-empty string"),
    ({"premise": "p", "hypothesis": "h", "label": 1.5}, "field 'label' must be"),
])
def test_bad_rows_name_their_line(tiny_gpt2_dir, tmp_path, row, message):
    tok = load_tokenizer(tiny_gpt2_dir)
    tokens, _ = task_tokens(tok)
    f = write_jsonl(tmp_path / "e.jsonl", [{"premise": "p", "hypothesis": "h", "label": "a"}, row])
    with pytest.raises(GptlabError, match=f"e.jsonl:2: {message}"):
        load_task_rows(f, "entailment", tok, tokens, seq_len=32)


def test_choice_rows_need_the_same_number_of_choices(tiny_gpt2_dir, tmp_path):
    tok = load_tokenizer(tiny_gpt2_dir)
    tokens, _ = task_tokens(tok)
    f = write_jsonl(tmp_path / "c.jsonl", [{"context": "c", "choices": ["a", "b"], "label": 0},
                                           {"context": "c", "choices": ["a", "b", "c"], "label": 5}])
    with pytest.raises(GptlabError, match="c.jsonl:2: field 'label' must be the index"):
        load_task_rows(f, "choice", tok, tokens, seq_len=32)


def _direct_predictions(result, task, path):
    tokens, _ = task_tokens(result.tokenizer)
    data = load_task_rows(path, task, result.tokenizer, tokens, 512, names=result.labels)
    model = result.model.eval()
    preds, labels = [], []
    with torch.no_grad():
        for seqs, label in data.examples:
            batch = GroupCollate(model.pad_id)([(seqs, label)])
            preds.append(int(model(batch["input_ids"]).argmax(-1)))
            labels.append(label)
    return preds, labels


@pytest.mark.parametrize("task, chance", [("entailment", 0.5), ("similarity", 0.5), ("choice", 1 / 3)])
def test_task_learns_above_chance_with_metrics_equal_to_a_direct_count(tiny_gpt2_dir, tmp_path, task, chance):
    cfg = config(tmp_path, task)
    result = finetune(str(tiny_gpt2_dir), cfg)
    m = result.metrics
    assert m["accuracy"] >= chance + 0.25, m["accuracy"]
    preds, labels = _direct_predictions(result, task, cfg.val_data)
    assert m["accuracy"] == pytest.approx(sum(p == y for p, y in zip(preds, labels)) / len(labels))
    for c, name in enumerate(result.labels):
        tp = sum(p == c and y == c for p, y in zip(preds, labels))
        assert m[f"recall/{name}"] == pytest.approx(tp / labels.count(c) if labels.count(c) else 0.0)

    # the saved checkpoint: one sequence's *ForSequenceClassification in transformers; a row's logits are
    # its sequences' outputs summed (similarity) or side by side (choice)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / task / "final").eval()
    saved = load_tokenizer(tmp_path / task / "final")
    assert all(saved.token_id(t) is not None for t in TOKENS)
    tokens, _ = task_tokens(result.tokenizer)
    (seqs, label), = load_task_rows(cfg.val_data, task, result.tokenizer, tokens, 512, result.labels).examples[:1]
    batch = GroupCollate(result.model.pad_id)([(seqs, label)])
    with torch.no_grad():
        ours = result.model(batch["input_ids"])
        theirs = hf(batch["input_ids"]).logits
    theirs = {"entailment": theirs, "similarity": theirs.sum(0, keepdim=True), "choice": theirs.view(1, -1)}[task]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_lm_loss_weight_changes_the_objective(tiny_gpt2_dir, tmp_path):
    a = finetune(str(tiny_gpt2_dir), config(tmp_path, "entailment", max_steps=3, lm_loss_weight=0.0,
                                            out_dir=str(tmp_path / "a")))
    b = finetune(str(tiny_gpt2_dir), config(tmp_path, "entailment", max_steps=3, lm_loss_weight=0.5,
                                            out_dir=str(tmp_path / "b")))
    assert b.metrics["loss"] > a.metrics["loss"] + 0.5  # + half an LM loss of several nats


def test_lora_with_new_tokens_is_refused(tiny_gpt2_dir, tmp_path):
    with pytest.raises(GptlabError, match="adds the tokens .* use --method full"):
        finetune(str(tiny_gpt2_dir), config(tmp_path, "choice", method="lora"))
