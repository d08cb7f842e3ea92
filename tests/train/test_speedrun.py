"""The speedrun's ingredients: Muon (Newton-Schulz orthogonalisation, which weights it takes, its AdamW half
equal to torch's, exact resume), ReLU^2 and zero-initialised projections, --compile auto, and the training-time
clock in eval records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptlab.models.config import Config
from gptlab.models.model import GPT
from gptlab.train.loop import LoopConfig
from gptlab.train.optim import Muon, make_optimizer, orthogonalize
from gptlab.train.runtime import compile_pays
from tests.train.test_train import losses, make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.mark.parametrize("shape", [(64, 24), (24, 64), (33, 33)])
def test_orthogonalize_pushes_singular_values_to_one_along_the_gradient(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    o = orthogonalize(g)
    assert o.shape == g.shape
    s = torch.linalg.svdvals(o)
    # the quintic iteration's band around 1, not exact; five steps lift all but the tiniest singular values
    # (a square random matrix has a few near 0) into it
    assert s.max() < 1.3 and (s > 0.5).float().mean() >= 0.9, s
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    cos = (o * (u @ vh)).sum() / (o.norm() * (u @ vh).norm())
    assert cos > 0.95  # it is U V^T, approximately


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = GPT(Config(n_layer=2, n_head=2, n_embd=16, context_length=8, vocab_size=50, tie_embeddings=False))
    opt = make_optimizer(model.parameters(), LoopConfig(optimizer="muon", lr=1e-3, muon_lr=0.02), torch.device("cpu"),
                         model)
    assert isinstance(opt, Muon)
    kinds = {id(p): (g["muon"], g["weight_decay"] > 0, g["lr_scale"]) for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        hidden = p.ndim == 2 and not name.startswith(("wte", "wpe", "lm_head"))
        assert kinds[id(p)][0] == hidden, name
        assert kinds[id(p)][1] == (p.ndim == 2), name  # decay on matrices, never on gains and biases
        assert kinds[id(p)][2] == (20.0 if hidden else 1.0), name  # muon_lr / lr follows the schedule
    with pytest.raises(Exception, match="needs the model"):
        make_optimizer(model.parameters(), LoopConfig(optimizer="muon"), torch.device("cpu"))


def test_muons_adamw_half_equals_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(7, 5))
    b = torch.nn.Parameter(a.detach().clone())
    ours = Muon([{"params": [a], "weight_decay": 0.1, "lr": 1e-2}], betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(6):
        g = torch.randn(7, 5, generator=torch.Generator().manual_seed(step))
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_muon_training_learns_and_resumes_bit_identically(pydocs, tmp_path):
    full = make_trainer(pydocs, tmp_path / "full", optimizer="muon", muon_lr=0.02)
    full.fit()
    curve = losses(tmp_path / "full")
    assert curve[8] < curve[1] - 0.1
    make_trainer(pydocs, tmp_path / "split", optimizer="muon", muon_lr=0.02, stop_at_step=4).fit()
    resumed = make_trainer(pydocs, tmp_path / "split", optimizer="muon", muon_lr=0.02, resume=True)
    resumed.fit()
    assert losses(tmp_path / "split") == curve
    for (k, v), w in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(v, w), k
    # the eval records carry the training-time clock (evaluations and saves left out)
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    clock = [r["train_s"] for r in rows if "val_loss" in r]
    assert len(clock) == 2 and 0 < clock[0] < clock[1]


def test_relu2_and_zero_initialised_projections():
    model = GPT(Config(n_layer=2, n_head=2, n_embd=16, context_length=8, vocab_size=50, activation="relu2",
                       zero_init_proj=True))
    for block in model.blocks:
        assert not block.attn.proj.weight.any() and not block.mlp.proj.weight.any()
    x = torch.linspace(-2, 2, 9)
    assert torch.equal(model.blocks[0].mlp.act(x), torch.relu(x) ** 2)
    plain = GPT(Config(n_layer=2, n_head=2, n_embd=16, context_length=8, vocab_size=50))
    assert plain.blocks[0].attn.proj.weight.std() > 0  # GPT-2's scaled normal init otherwise


def test_compile_auto_compiles_where_it_was_measured_to_pay(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_pays("on", cpu, None) and not compile_pays("off", cuda, torch.bfloat16)
    assert compile_pays("auto", cuda, None)
    assert not compile_pays("auto", cpu, None)  # fp32 on a CPU: no gain measured
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/c++")
    assert compile_pays("auto", cpu, torch.bfloat16)
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert not compile_pays("auto", cpu, torch.bfloat16)  # inductor needs a C++ compiler


def test_the_speedrun_recipe_trains_a_model_transformers_opens(pydocs, tmp_path):
    import transformers

    import gptlab
    from gptlab.recipe import load_recipe
    from gptlab.train.pretrain import TrainConfig, run_pretraining

    root = Path(__file__).resolve().parents[2] / "recipes"
    cfg = load_recipe(TrainConfig, root / "speedrun-python-docs.yaml",
                      {"data": str(pydocs), "max_steps": 3, "time_budget": "", "eval_every": 0,
                       "out_dir": str(tmp_path / "run"), "sample_prompt": "", "quiet": True})
    assert cfg.optimizer == "muon" and cfg.model.zero_init_proj
    run_pretraining(cfg)
    final = tmp_path / "run" / "final"
    ours = gptlab.load(final)
    ref = transformers.AutoModelForCausalLM.from_pretrained(final)
    x = torch.randint(0, ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x).logits, rtol=1e-4, atol=1e-4)
