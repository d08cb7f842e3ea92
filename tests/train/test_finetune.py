"""Fine-tuning on the one training loop: data shapes, prompt masking, SFT that learns, classification,
exact LoRA resume, early stopping with the best checkpoint kept, and the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import gptlab
from gptlab.data import examples as sft
from gptlab.errors import GptlabError
from gptlab.train.finetune import FinetuneConfig, finetune
from gptlab.tokenizer import load_tokenizer

RULES = {"red": 7, "blue": 3, "green": 12, "amber": 5, "violet": 9, "gold": 21, "silver": 14, "black": 0}
CLASSES = {"fruit": ["apple", "banana", "cherry", "grape"], "tool": ["hammer", "wrench", "saw", "drill"],
           "animal": ["horse", "tiger", "rabbit", "eagle"]}
FILLER = "the a one this is was near under big small old new green quiet".split()
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def rules_rows():
    return [{"instruction": f"How many points is a {c} token worth?", "output": f"A {c} token is worth {v} points."}
            for c, v in RULES.items()]


def class_rows(n: int, seed: int, random_labels: bool = False):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(CLASSES))
        words = [rng.choice(FILLER) for _ in range(rng.randint(4, 8))]
        words.insert(rng.randint(0, len(words)), rng.choice(CLASSES[label]))
        rows.append({"text": " ".join(words), "label": rng.choice(sorted(CLASSES)) if random_labels else label})
    return rows


def quick(tmp_path, name, **kw) -> FinetuneConfig:
    base = dict(out_dir=str(tmp_path / name), precision="fp32", quiet=True, warmup_steps=2, batch_size=8,
                eval_every=0, val_fraction=0.0, log_every=1000)
    return FinetuneConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------------------------
# data


def test_row_shapes_read_as_the_same_conversation():
    want = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    shapes = [
        {"messages": want},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"instruction": "Q", "output": "A"},
        {"prompt": "Q", "completion": "A"},
    ]
    for row in shapes:
        assert sft.to_messages(row, "x") == want
    assert sft.to_messages({"instruction": "Q", "input": "ctx", "output": "A"}, "x")[0]["content"] == "Q\n\nctx"


def test_malformed_rows_name_their_line_or_are_counted_when_skipped(tmp_path, tiny_gpt2_dir):
    tok = load_tokenizer(tiny_gpt2_dir)
    f = write_jsonl(tmp_path / "d.jsonl", [rules_rows()[0], "", "{not json", {"question": "?"}, rules_rows()[1],
                                           {"messages": [{"role": "user", "content": "no answer"}]}])
    with pytest.raises(GptlabError, match=r"d\.jsonl:3: not valid JSON"):
        sft.encode_file(f, tok, "sft", 64)
    enc = sft.encode_file(f, tok, "sft", 64, skip_bad=True)
    assert len(enc.examples) == 2 and enc.skipped.count == 3
    assert any("d.jsonl:4" in r for r in enc.skipped.reasons) and any("d.jsonl:6" in r for r in enc.skipped.reasons)
    bad = write_jsonl(tmp_path / "c.jsonl", [{"text": "fine", "label": "a"}, {"text": "x", "label": [1]}])
    from gptlab.data.examples import load_class_rows

    with pytest.raises(GptlabError, match=r"c\.jsonl:2: field 'label'"):
        load_class_rows(bad, tok, 64)


@pytest.mark.parametrize("template", ["plain", "chatml"])
def test_labels_cover_exactly_the_answers_and_their_end_of_turn(tiny_gpt2_dir, template):
    tok = load_tokenizer(tiny_gpt2_dir)
    if template == "chatml":
        from tokenizers import AddedToken

        tok.backend.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
        tok.chat_template, tok.eos_token = CHATML, "<|im_end|>"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two and two?"},
            {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And three and three?"},
            {"role": "assistant", "content": "Six."}]
    sft.ensure_chat_template(tok)
    ids, trained = sft.encode_chat(tok, msgs)
    end = "<|im_end|>\n" if template == "chatml" else "<|endoftext|>"
    assert tok.decode([i for i, t in zip(ids, trained) if t]) == f"Four.{end}Six.{end}"
    assert tok.decode(ids) == tok.apply_chat_template(msgs, add_generation_prompt=False)
    x, y = sft.shift(ids, trained)
    assert len(x) == len(y) == len(ids) - 1
    assert all(label == sft.IGNORE_INDEX for label, t in zip(y, trained[1:]) if not t)


def test_prompt_tokens_contribute_nothing_to_loss_or_gradients(tiny_gpt2_dir):
    from gptlab.train.losses import next_token_loss

    tok = load_tokenizer(tiny_gpt2_dir)
    sft.ensure_chat_template(tok)
    rows = [sft.shift(*sft.encode_chat(tok, sft.to_messages(r, "x"))) for r in rules_rows()[:3]]
    batch = sft.Collate(tok.eos_id)(rows)
    model = gptlab.load(tiny_gpt2_dir).float()
    captured = {}

    def keep(module, args, out):
        out.retain_grad()
        captured["h"] = out

    handle = model.norm_f.register_forward_hook(keep)
    loss, count = next_token_loss(model, batch)
    loss.backward()
    handle.remove()
    masked = batch["labels"] == sft.IGNORE_INDEX
    grad = captured["h"].grad.abs().sum(-1)  # (B, T): gradient reaching each position's output
    assert masked.any() and (~masked).any()
    assert torch.all(grad[masked] == 0)  # prompt (and padding) positions: no gradient at all
    assert torch.all(grad[~masked] > 0)
    with torch.no_grad():
        logits = model(batch["input_ids"])
    direct = sum(torch.nn.functional.cross_entropy(logits[b, t], batch["labels"][b, t], reduction="sum")
                 for b, t in (~masked).nonzero().tolist())
    assert int(count) == int((~masked).sum())
    torch.testing.assert_close(loss.detach(), direct, atol=1e-4, rtol=1e-5)


def test_packing_keeps_every_label_and_the_row_length(tiny_gpt2_dir):
    tok = load_tokenizer(tiny_gpt2_dir)
    sft.ensure_chat_template(tok)
    examples = [sft.encode_chat(tok, sft.to_messages(r, "x")) for r in rules_rows()]
    packed = sft.to_rows(examples, seq_len=200, pack=True, seed=0)
    plain = sft.to_rows(examples, seq_len=200)
    assert len(packed) < len(plain) and all(len(x) <= 200 for x, _ in packed)
    count = lambda rows: sorted(t for _, y in rows for t in y if t != sft.IGNORE_INDEX)  # noqa: E731
    # the first token of each packed example follows the previous example's EOS; it is a prompt token
    assert count(packed) == count(plain)


# ---------------------------------------------------------------------------------------------------------
# training


def test_sft_learns_the_rules_and_answers_them_exactly(tmp_path, tiny_gpt2_dir):
    from gptlab.infer.generate import generate

    data = write_jsonl(tmp_path / "rules.jsonl", rules_rows())
    cfg = quick(tmp_path, "sft", data=str(data), method="full", task="sft", max_steps=60, lr=5e-3, min_lr=1e-3)
    result = finetune(str(tiny_gpt2_dir), cfg)
    reloaded = gptlab.load(tmp_path / "sft/final")
    tok = load_tokenizer(tmp_path / "sft/final")  # the plain chat template was saved with the model
    assert tok.chat_template == sft.INSTRUCTION_TEMPLATE
    for row in rules_rows():
        prompt = tok.apply_chat_template([{"role": "user", "content": row["instruction"]}])
        assert generate(result.model.eval(), tok, prompt, max_new_tokens=20, temperature=0) == row["output"]
        assert generate(reloaded, tok, prompt, max_new_tokens=20, temperature=0) == row["output"]


def test_classification_beats_chance_and_its_metrics_match_a_direct_count(tmp_path, tiny_gpt2_dir):
    from gptlab.data.examples import load_class_rows

    train = write_jsonl(tmp_path / "train.jsonl", class_rows(150, seed=0))
    val = write_jsonl(tmp_path / "val.jsonl", class_rows(60, seed=1))
    cfg = quick(tmp_path, "cls", data=str(train), val_data=str(val), method="full", task="classify", max_steps=60,
                lr=3e-3, min_lr=3e-4, batch_size=16, eval_every=30)
    result = finetune(str(tiny_gpt2_dir), cfg)
    m = result.metrics
    assert m["accuracy"] > 0.6  # chance is 1/3

    clf = result.model.eval()
    rows = load_class_rows(val, result.tokenizer, 512, names=result.labels)
    preds, labels = [], []
    with torch.no_grad():
        for ids, label in rows.examples:
            preds.append(int(clf(torch.tensor([ids])).argmax(-1)))
            labels.append(label)
    assert m["accuracy"] == pytest.approx(sum(p == y for p, y in zip(preds, labels)) / len(labels))
    for c, name in enumerate(result.labels):
        tp = sum(p == c and y == c for p, y in zip(preds, labels))
        n_pred, n_true = preds.count(c), labels.count(c)
        p, r = tp / n_pred if n_pred else 0.0, tp / n_true if n_true else 0.0
        assert m[f"precision/{name}"] == pytest.approx(p)
        assert m[f"recall/{name}"] == pytest.approx(r)
        assert m[f"f1/{name}"] == pytest.approx(2 * p * r / (p + r) if p + r else 0.0)

    # the saved classifier opens in transformers with the same logits
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls/final").eval()
    assert hf.config.id2label == dict(enumerate(result.labels))
    batch = sft.Collate(clf.pad_id)([rows.examples[i] for i in range(6)])
    with torch.no_grad():
        torch.testing.assert_close(hf(batch["input_ids"]).logits, clf(batch["input_ids"]), atol=1e-5, rtol=1e-5)


def test_lora_classifier_adapter_loads_in_peft(tmp_path, tiny_gpt2_dir):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    train = write_jsonl(tmp_path / "train.jsonl", class_rows(40, seed=0))
    cfg = quick(tmp_path, "lcls", data=str(train), method="lora", task="classify", max_steps=4, lr=1e-2,
                lora_targets=["c_attn", "c_fc"])
    result = finetune(str(tiny_gpt2_dir), cfg)
    clf = result.model.eval()
    assert sorted(n for n, p in clf.named_parameters() if p.requires_grad and ".lora_" not in n) == ["score.weight"]
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        tiny_gpt2_dir, num_labels=len(result.labels), pad_token_id=clf.pad_id)
    hf = peft.PeftModel.from_pretrained(base, tmp_path / "lcls/final").eval()
    ids = torch.tensor([[5, 17, 3, 42, 8, 99, 1, 23], [11, 2, 90, 33, 4, clf.pad_id, clf.pad_id, clf.pad_id]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, clf(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,task", [("lora", "sft"), ("full", "classify")])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, tiny_gpt2_dir, capsys, method, task):
    from safetensors.torch import load_file

    if task == "sft":
        data = write_jsonl(tmp_path / "d.jsonl", rules_rows() * 2)
        weights = "adapter_model.safetensors"
    else:
        data = write_jsonl(tmp_path / "d.jsonl", class_rows(24, seed=0))
        weights = "model.safetensors"
    # dropout and a validation split make the RNG state and the best-so-far part of what must be restored
    common = dict(data=str(data), method=method, task=task, max_steps=10, lr=1e-2, batch_size=4, lora_dropout=0.1,
                  val_fraction=0.25, eval_every=4, lora_targets=["c_attn", "mlp.proj"])
    finetune(str(tiny_gpt2_dir), quick(tmp_path, "straight", **common))
    stopped = finetune(str(tiny_gpt2_dir), quick(tmp_path, "resumed", stop_at_step=6, **common))
    assert stopped.stopped
    capsys.readouterr()
    finetune(str(tiny_gpt2_dir), quick(tmp_path, "resumed", resume=True, quiet=False, **common))
    assert "at step 6" in capsys.readouterr().out  # it did continue, rather than start over
    a = load_file(str(tmp_path / "straight/final" / weights))
    b = load_file(str(tmp_path / "resumed/final" / weights))
    if method == "lora":
        assert len(a) == 8  # A and B of c_attn and mlp.c_proj in 2 layers
    assert a.keys() == b.keys()
    assert ("score.weight" in a) == (task == "classify")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_early_stopping_keeps_the_best_checkpoint(tmp_path, tiny_gpt2_dir):
    from gptlab.formats.hf import load_classifier

    # validation labels are noise: as the model fits the training labels, validation loss rises
    train = write_jsonl(tmp_path / "train.jsonl", class_rows(64, seed=0))
    val = write_jsonl(tmp_path / "val.jsonl", class_rows(32, seed=1, random_labels=True))
    cfg = quick(tmp_path, "es", data=str(train), val_data=str(val), method="full", task="classify", max_steps=60,
                lr=1e-2, schedule="constant", eval_every=3, patience=2)
    result = finetune(str(tiny_gpt2_dir), cfg)
    evals = {}
    for r in map(json.loads, (tmp_path / "es/metrics.jsonl").read_text().splitlines()):
        if "val_loss" in r:
            evals.setdefault(r["step"], r)  # the loop evaluates once more at the step it stopped at
    evals = list(evals.values())
    losses = [r["val_loss"] for r in evals]
    best = losses.index(min(losses))
    assert evals[-1]["step"] < 60, "training should have stopped early"
    assert len(losses) - 1 - best == cfg.patience  # stopped exactly `patience` evaluations after the best
    clf, _ = load_classifier(tmp_path / "es/best")
    rows = [e for e in zip(*_class_tensors(val, result))]
    with torch.no_grad():
        loss = sum(torch.nn.functional.cross_entropy(clf(x[None]), y[None], reduction="sum") for x, y in rows) / len(rows)
    assert loss.item() == pytest.approx(min(losses), rel=1e-4)


def _class_tensors(path, result):
    from gptlab.data.examples import load_class_rows

    rows = load_class_rows(path, result.tokenizer, 512, names=result.labels)
    return [torch.tensor(ids) for ids, _ in rows.examples], [torch.tensor(y) for _, y in rows.examples]


def test_merged_lora_model_equals_base_plus_adapter(tmp_path, tiny_gpt2_dir):
    from gptlab.formats.peft import load_adapter

    data = write_jsonl(tmp_path / "rules.jsonl", rules_rows())
    cfg = quick(tmp_path, "merge", data=str(data), method="lora", task="sft", max_steps=3, lr=1e-2,
                lora_targets=["all-linear"], save_merged=True)
    finetune(str(tiny_gpt2_dir), cfg)
    merged = gptlab.load(tmp_path / "merge/merged")
    base = gptlab.load(tiny_gpt2_dir).float()
    load_adapter(base, tmp_path / "merge/final")
    ids = torch.tensor([[5, 17, 3, 42, 8, 99, 1, 23]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), base(ids), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# CLI and recipes


def test_cli_finetune_runs_lm_with_lora(tmp_path, tiny_gpt2_dir):
    from gptlab.cli import main

    data = write_jsonl(tmp_path / "text.jsonl", [{"text": "The with statement wraps a block."}] * 6)
    out = tmp_path / "cli"
    rc = main(["finetune", str(tiny_gpt2_dir), "--data", str(data), "--task=lm", "--method=lora", "--max-steps=2",
               "--lora-targets", "c_attn", "--precision=fp32", "--quiet", "--val-fraction=0", f"--out-dir={out}"])
    assert rc == 0
    cfg = json.loads((out / "final/adapter_config.json").read_text())
    assert cfg["target_modules"] == ["c_attn"] and cfg["task_type"] == "CAUSAL_LM"
    assert main(["finetune", str(tiny_gpt2_dir), "--data", str(tmp_path / "missing.jsonl"), "--quiet",
                 f"--out-dir={out}"]) == 1


def test_recipes_are_valid_finetune_configs():
    from gptlab.recipe import load_recipe

    recipes = sorted((Path(__file__).parents[2] / "recipes").glob("finetune-*.yaml"))
    assert recipes
    for path in recipes:
        cfg = load_recipe(FinetuneConfig, path, {})
        assert cfg.method in ("full", "lora") and cfg.task in ("sft", "classification", "lm")


def test_long_lm_documents_become_windows_with_every_token_a_target_once(tmp_path, tiny_gpt2_dir):
    from tests.conftest import pydoc_text

    tok = load_tokenizer(tiny_gpt2_dir)
    text = pydoc_text(3000)
    enc = sft.encode_file(write_jsonl(tmp_path / "lm.jsonl", [{"text": text}]), tok, "lm", seq_len=100)
    rows = sft.to_rows(enc.examples, seq_len=100)
    assert enc.split == 1 and len(rows) > 1 and all(len(x) <= 100 for x, _ in rows)
    assert [t for _, y in rows for t in y] == (tok.encode(text) + [tok.eos_id])[1:]


def test_resuming_a_lora_run_as_full_names_the_setting(tmp_path, tiny_gpt2_dir, capsys):
    from gptlab.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", rules_rows())
    common = ["finetune", str(tiny_gpt2_dir), "--data", str(data), "--max-steps", "4", "--out-dir",
              str(tmp_path / "run"), "--precision", "fp32", "--quiet", "--val-fraction", "0"]
    assert main([*common, "--method", "lora", "--stop-at-step", "2"]) == 0
    before = sorted(p.name for p in (tmp_path / "run" / "last").iterdir())
    capsys.readouterr()
    assert main([*common, "--method", "full", "--resume"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "was written by a run with --method lora, this one has full" in err
    assert sorted(p.name for p in (tmp_path / "run" / "last").iterdir()) == before  # nothing touched
