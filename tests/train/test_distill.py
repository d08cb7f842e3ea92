"""Logit distillation: the generalised JSD against its definition and TRL's GKD, learning on a CPU, and the
teacher checks (same tokenizer, a longer padded vocabulary sliced)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import gptlab
from gptlab.cli import main
from gptlab.train.distill import generalized_jsd
from gptlab.train.finetune import FinetuneConfig, finetune

pytestmark = pytest.mark.usefixtures("one_thread")


def _kl(p_logits, q_logits):  # KL(p || q) per row, by the definition
    p, logp, logq = F.softmax(p_logits, -1), F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    return (p * (logp - logq)).sum(-1)


def test_jsd_ends_are_the_two_kls_and_identical_logits_give_zero():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 11, generator=g, dtype=torch.float64), torch.randn(6, 11, generator=g, dtype=torch.float64)
    assert torch.allclose(generalized_jsd(s, t, beta=0.0), _kl(t, s))  # forward KL(teacher || student)
    assert torch.allclose(generalized_jsd(s, t, beta=1.0), _kl(s, t))  # reverse KL(student || teacher)
    for beta in (0.0, 0.3, 1.0):
        assert generalized_jsd(s, s, beta=beta).abs().max() < 1e-12
    mid = generalized_jsd(s, t, beta=0.5)
    m = 0.5 * (F.softmax(s, -1) + F.softmax(t, -1))
    want = 0.5 * (F.softmax(t, -1) * (F.log_softmax(t, -1) - m.log())).sum(-1) + \
        0.5 * (F.softmax(s, -1) * (F.log_softmax(s, -1) - m.log())).sum(-1)
    assert torch.allclose(mid, want) and (mid <= torch.log(torch.tensor(2.0))).all()


@pytest.mark.parametrize("beta,temperature", [(0.0, 1.0), (0.3, 2.0), (0.5, 1.0), (1.0, 0.7)])
def test_jsd_equals_trl_gkd(beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 13, generator=g, dtype=torch.float64), torch.randn(2, 5, 13, generator=g, dtype=torch.float64)
    theirs = GKDTrainer.generalized_jsd_loss(s, t, beta=beta, temperature=temperature, reduction="sum")
    ours = generalized_jsd(s.flatten(0, 1), t.flatten(0, 1), beta, temperature).sum()
    assert abs(float(ours) - float(theirs)) < 1e-10


def test_a_longer_teacher_vocabulary_is_sliced():
    s, t = torch.randn(3, 8), torch.randn(3, 8)
    padded = torch.cat([t, torch.full((3, 4), 30.0)], -1)  # padding logits past the student's vocabulary
    assert torch.equal(generalized_jsd(s, padded, 0.5), generalized_jsd(s, t, 0.5))


@pytest.fixture(scope="module")
def teacher_and_text(tmp_path_factory, tiny_gpt2_dir, corpus_text):
    """A teacher: the tiny GPT-2 trained briefly on python-docs text; train / held-out text rows."""
    root = tmp_path_factory.mktemp("distill")
    pieces = [corpus_text[i: i + 300] for i in range(0, 60_000, 300)]
    train, held = root / "train.jsonl", root / "held.jsonl"
    train.write_text("".join(json.dumps({"text": p}) + "\n" for p in pieces[:150]))
    held.write_text("".join(json.dumps({"text": p}) + "\n" for p in pieces[150:180]))
    finetune(str(tiny_gpt2_dir), FinetuneConfig(data=str(train), task="lm", method="full", val_fraction=0.0,
                                                 max_steps=80, batch_size=8, lr=3e-3, warmup_steps=0, eval_every=0,
                                                 seq_len=64, out_dir=str(root / "teacher"), quiet=True,
                                                 precision="fp32"))
    return root / "teacher" / "final", train, held


def _held_kl(student_dir, teacher_dir, held) -> float:
    from gptlab.data.examples import encode_file

    student, teacher = gptlab.load(student_dir).float(), gptlab.load(teacher_dir).float()
    tok = gptlab.load_tokenizer(student_dir)
    kls = []
    with torch.no_grad():
        for ids, _ in encode_file(held, tok, "lm", 64).examples:
            x = torch.tensor([ids[:-1]])
            kls.append(generalized_jsd(student(x)[0], teacher(x)[0], 0.0).mean())
    return float(torch.stack(kls).mean())


def test_distillation_halves_the_kl_to_the_teacher(tmp_path, teacher_and_text):
    from tests.conftest import make_hf_model, save_hf_model

    teacher, train, held = teacher_and_text
    tok = gptlab.load_tokenizer(teacher)
    student = save_hf_model(make_hf_model("gpt2", seed=7, vocab_size=tok.vocab_size, n_positions=128, n_layer=1,
                                          bos_token_id=0, eos_token_id=0), tmp_path / "student", tok)
    before = _held_kl(student, teacher, held)
    finetune(str(student), FinetuneConfig(data=str(train), task="distill", teacher=str(teacher), jsd_beta=0.0,
                                          method="full", val_fraction=0.0, max_steps=60, batch_size=8, lr=3e-3,
                                          warmup_steps=0, eval_every=0, seq_len=64, out_dir=str(tmp_path / "run"),
                                          quiet=True, precision="fp32"))
    after = _held_kl(tmp_path / "run" / "final", teacher, held)
    assert after < before / 2, (before, after)
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"kl"' in x]
    assert log and abs(log[-1]["kl"] - log[-1]["loss"]) < 1e-6  # beta 0: the loss is the forward KL


def test_teachers_of_another_tokenizer_or_a_smaller_vocabulary_are_refused(tmp_path, tiny_gpt2_dir, teacher_and_text,
                                                                           capsys):
    from gptlab.tokenizer import train_tokenizer
    from tests.conftest import make_hf_model, save_hf_model

    _, train, _ = teacher_and_text
    other_tok = train_tokenizer(["a completely different corpus " * 50], vocab_size=300, show_progress=False)
    other = save_hf_model(make_hf_model("gpt2", vocab_size=600, n_positions=128, bos_token_id=0, eos_token_id=0),
                          tmp_path / "other", other_tok)
    tok = gptlab.load_tokenizer(tiny_gpt2_dir)
    small = save_hf_model(make_hf_model("gpt2", vocab_size=tok.vocab_size - 12, n_positions=128, bos_token_id=0,
                                        eos_token_id=0), tmp_path / "small", tok)
    capsys.readouterr()  # transformers' progress lines from saving the models
    for teacher, says in ((other, "has a different tokenizer"), (small, "smaller than the student's"),
                          (None, "needs --teacher DIR")):
        argv = ["finetune", str(tiny_gpt2_dir), "--task", "distill", "--data", str(train), "--method", "full",
                "--out-dir", str(tmp_path / "r"), "--quiet", "--val-fraction", "0", "--max-steps", "1"]
        assert main(argv + (["--teacher", str(teacher)] if teacher else [])) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and says in err, err


def test_on_policy_steps_use_the_students_own_samples(tmp_path, teacher_and_text, corpus_text, capsys):
    teacher, train, _ = teacher_and_text
    rows = tmp_path / "sft.jsonl"
    rows.write_text("".join(json.dumps({"prompt": corpus_text[i: i + 40], "completion": corpus_text[i + 40: i + 70]})
                            + "\n" for i in range(0, 4000, 100)))
    cfg = dict(data=str(rows), task="distill", teacher=str(teacher), method="full", val_fraction=0.0, max_steps=8,
               batch_size=4, lr=1e-3, warmup_steps=0, eval_every=0, log_every=1, seq_len=64, quiet=True,
               precision="fp32", max_new_tokens=8, on_policy=0.5)
    finetune(str(teacher), FinetuneConfig(**cfg, out_dir=str(tmp_path / "a")))
    log = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines() if '"kl"' in x]
    marks = [round(r["on_policy"]) for r in log]
    assert set(marks) == {0, 1} and all(r["on_policy"] in (0.0, 1.0) for r in log)  # whole micro-batches
    finetune(str(teacher), FinetuneConfig(**cfg, out_dir=str(tmp_path / "b")))  # seeded: the same steps, same samples
    again = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines() if '"kl"' in x]
    assert [r["on_policy"] for r in again] == [r["on_policy"] for r in log]
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in log], abs=1e-6)
    # plain text rows have no prompt to sample from
    argv = ["finetune", str(teacher), "--task", "distill", "--teacher", str(teacher), "--data", str(train),
            "--on-policy", "1", "--method", "full", "--max-steps", "1", "--out-dir", str(tmp_path / "c"), "--quiet",
            "--val-fraction", "0"]
    assert main(argv) == 1
    assert "--on-policy needs rows with a prompt" in capsys.readouterr().err
