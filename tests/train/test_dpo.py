"""DPO on the one loop: the loss formulas in float64, parity with TRL's DPOTrainer on the same model and
batch, learning on a CPU, gradient-accumulation invariance, and bad rows."""

from __future__ import annotations

import json
import math

import pytest
import torch

import gptlab
from gptlab.cli import main
from gptlab.train.finetune import FinetuneConfig, finetune
from gptlab.train.preference import LOSSES, DPOLoss, Pair, PairCollate, dpo_losses, sequence_logps

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("loss,expected", [("sigmoid", math.log(2)), ("hinge", 1.0), ("ipo", (1 / (2 * 0.1)) ** 2),
                                           ("robust", math.log(2))])
def test_policy_equal_to_reference_gives_the_textbook_values(loss, expected):
    logps = torch.tensor([-3.0, -7.5, -1.25], dtype=torch.float64)
    other = torch.tensor([-4.0, -2.0, -9.0], dtype=torch.float64)
    tokens = torch.tensor([3, 5, 2])
    out, chosen, rejected = dpo_losses(logps, other, logps, other, beta=0.1, loss=loss, label_smoothing=0.2,
                                       chosen_tokens=tokens, rejected_tokens=tokens)
    assert torch.allclose(out, torch.full_like(out, expected), atol=1e-12, rtol=0)
    assert not chosen.any() and not rejected.any()


def test_loss_falls_as_the_margin_grows_and_robust_smooths():
    c, r = torch.tensor([0.0, 1.0, 5.0], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    sig = dpo_losses(c, r, r, r, beta=1.0)[0]
    assert (sig.diff() < 0).all()
    robust = dpo_losses(c, r, r, r, beta=1.0, loss="robust", label_smoothing=0.1)[0]
    e = 0.1  # (-(1-e) log s(x) + e log s(-x)) / (1 - 2e)
    want = (-(1 - e) * torch.nn.functional.logsigmoid(c) + e * torch.nn.functional.logsigmoid(-c)) / (1 - 2 * e)
    assert torch.allclose(robust, want)


def _rows(n=16):
    words = "tuple list dict set class function module import".split()
    return [{"prompt": f"Question {i}: what is a {words[i % 8]}?\nAnswer:", "chosen": f" A {words[i % 8]} is an object.",
             "rejected": f" I do not know {i}."} for i in range(n)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------------------
# parity with TRL


@pytest.fixture(scope="module")
def trl_setup(tmp_path_factory, tiny_tokenizer):
    """A tiny random GPT-2 as policy, another as reference (float64), and TRL's tokenizer for them."""
    from tests.conftest import make_hf_model, save_hf_model
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("trl")
    kw = dict(vocab_size=tiny_tokenizer.vocab_size, n_positions=128, bos_token_id=0, eos_token_id=0)
    policy, ref = make_hf_model("gpt2", seed=1, **kw), make_hf_model("gpt2", seed=2, **kw)
    save_hf_model(policy, root / "policy", tiny_tokenizer)
    save_hf_model(ref, root / "ref", tiny_tokenizer)
    policy, ref = policy.double().eval(), ref.double().eval()  # float64 on both sides: only the method differs
    hf_tok = PreTrainedTokenizerFast.from_pretrained(root / "policy")
    hf_tok.pad_token = hf_tok.eos_token
    return root, policy, ref, hf_tok


def _trl_loss(trl_setup, loss_type, beta=0.1, label_smoothing=0.0):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    root, policy, ref, hf_tok = trl_setup
    args = DPOConfig(output_dir=str(root / "out"), loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                     report_to=[], per_device_train_batch_size=4, max_length=None, use_cpu=True, bf16=False,
                     dataloader_num_workers=0)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(_rows(4)),
                         processing_class=hf_tok)
    examples = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(examples)
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return float(loss), examples


@pytest.mark.parametrize("loss_type", LOSSES)
def test_loss_equals_trl(trl_setup, loss_type):
    root = trl_setup[0]
    trl_value, examples = _trl_loss(trl_setup, loss_type, beta=0.3, label_smoothing=0.1 if loss_type == "robust" else 0.0)
    pairs = [Pair(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in examples]  # the same token ids
    batch = PairCollate(0)(pairs)
    policy, ref = gptlab.load(root / "policy").double(), gptlab.load(root / "ref").double()
    with torch.no_grad():
        ref_logps = sequence_logps(ref, batch)[0]
        loss, n, _ = DPOLoss(policy, beta=0.3, loss=loss_type, label_smoothing=0.1 if loss_type == "robust" else 0.0,
                             precomputed=True)(policy, {**batch, "ref_logps": ref_logps})
    assert abs(float(loss) / n - trl_value) < 1e-6, (float(loss) / n, trl_value)


# ---------------------------------------------------------------------------------------------------------
# training


def _cfg(tmp_path, data, **kw):
    base = dict(data=str(data), task="dpo", method="lora", lora_targets=["all-linear"], lora_r=8, val_fraction=0.0,
                max_steps=40, batch_size=4, lr=5e-3, min_lr=5e-4, warmup_steps=0, eval_every=0, log_every=1,
                out_dir=str(tmp_path / "run"), quiet=True, precision="fp32", beta=0.5)
    return FinetuneConfig(**{**base, **kw})


def _log(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_dpo_learns_the_preferences_and_starts_at_ln2(tmp_path, tiny_gpt2_dir):
    data = _write(tmp_path / "pairs.jsonl", _rows(16))
    finetune(str(tiny_gpt2_dir), _cfg(tmp_path, data))
    log = _log(tmp_path / "run")
    assert abs(log[0]["loss"] - math.log(2)) < 1e-6  # the adapters start at zero: policy = reference
    assert log[0]["rewards/margins"] == 0
    assert log[-1]["rewards/accuracy"] == 1.0 and log[-1]["loss"] < 0.3
    # the reference was the base: the saved adapter is a PEFT dir over it
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()


def test_full_fine_tuning_keeps_a_frozen_reference_or_precomputes_it(tmp_path, tiny_gpt2_dir):
    data = _write(tmp_path / "pairs.jsonl", _rows(8))
    logs = []
    for i, pre in enumerate((False, True)):
        finetune(str(tiny_gpt2_dir), _cfg(tmp_path, data, method="full", max_steps=6, lr=1e-3, precompute_ref=pre,
                                          out_dir=str(tmp_path / f"run{i}")))
        logs.append(_log(tmp_path / f"run{i}"))
    assert abs(logs[0][0]["loss"] - math.log(2)) < 1e-6
    for a, b in zip(*logs):  # the same reference either way
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_gradient_accumulation_invariance(tmp_path, tiny_gpt2_dir):
    data = _write(tmp_path / "pairs.jsonl", _rows(8))
    states = []
    for i, (bs, accum) in enumerate(((4, 1), (1, 4))):
        r = finetune(str(tiny_gpt2_dir), _cfg(tmp_path, data, batch_size=bs, grad_accum=accum, max_steps=3,
                                              out_dir=str(tmp_path / f"acc{i}")))
        states.append({k: v.detach().clone() for k, v in r.model.state_dict().items()})
    assert max((states[0][k] - states[1][k]).abs().max().item() for k in states[0]) < 1e-5


@pytest.mark.parametrize("row,says", [
    ({"prompt": "Q?", "rejected": " no"}, "pairs.jsonl:2: no 'chosen' field"),
    ({"prompt": "Q?", "chosen": "", "rejected": " no"}, "pairs.jsonl:2: 'chosen' is empty"),
    ({"chosen": " yes", "rejected": " no"}, "pairs.jsonl:2: no 'prompt' field"),
    ({"prompt": "Q?", "chosen": [{"role": "assistant", "content": "yes"}], "rejected": " no"}, "must all be text, or all chat messages"),
])
def test_bad_rows_are_one_error_naming_the_row(tmp_path, tiny_gpt2_dir, capsys, row, says):
    data = _write(tmp_path / "pairs.jsonl", [_rows(1)[0], row])
    assert main(["finetune", str(tiny_gpt2_dir), "--task", "dpo", "--data", str(data), "--out-dir",
                 str(tmp_path / "r"), "--quiet", "--val-fraction", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and says in err, err


def test_chat_rows_render_through_the_template(tiny_tokenizer):
    from gptlab.train.preference import encode_pair

    row = {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
           "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}
    from gptlab.data.examples import INSTRUCTION_TEMPLATE

    tiny_tokenizer.chat_template, saved = INSTRUCTION_TEMPLATE, tiny_tokenizer.chat_template
    try:
        p = encode_pair(tiny_tokenizer, row, "x:1")
        head = tiny_tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True)
        assert tiny_tokenizer.decode(p.prompt) == head
        assert tiny_tokenizer.decode(p.chosen).startswith("4") and p.chosen[-1] == tiny_tokenizer.eos_id
    finally:
        tiny_tokenizer.chat_template = saved


def test_resume_ends_with_the_same_weights(tmp_path, tiny_gpt2_dir):
    data = _write(tmp_path / "pairs.jsonl", _rows(8))
    whole = finetune(str(tiny_gpt2_dir), _cfg(tmp_path, data, max_steps=4, out_dir=str(tmp_path / "a"))).model
    finetune(str(tiny_gpt2_dir), _cfg(tmp_path, data, max_steps=4, stop_at_step=2, out_dir=str(tmp_path / "b")))
    resumed = finetune(str(tiny_gpt2_dir), _cfg(tmp_path, data, max_steps=4, resume=True, out_dir=str(tmp_path / "b"))).model
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
