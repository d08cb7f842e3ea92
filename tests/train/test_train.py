"""The training loop: exact resume (also after SIGKILL), DDP equals one process, it learns python-docs,
the fused loss equals cross-entropy, and `gptlab train` writes models that load."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gptlab import cli
from gptlab.models.config import Config
from gptlab.data.shards import TokenWindows, read_manifest
from gptlab.models.model import GPT
from gptlab.train.loop import LoopConfig, Trainer
from gptlab.train.optim import lr_at, make_optimizer
from gptlab.train.losses import linear_cross_entropy, next_token_loss
from tests.train.conftest import free_port

HERE = Path(__file__).parent


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread




def tiny_model(vocab: int, seed: int = 0, dropout: float = 0.1) -> GPT:
    torch.manual_seed(seed)
    return GPT(Config(n_layer=2, n_head=2, n_embd=32, context_length=32, vocab_size=vocab, dropout=dropout))


def make_trainer(data: Path, out: Path, batch_size: int = 4, dist=None, saver=None, callbacks=(), dropout=0.1,
                 **overrides):
    """The run the resume and DDP tests repeat: dropout on, so the RNG state must be restored too."""
    cfg = LoopConfig(out_dir=str(out), max_steps=8, batch_size=batch_size, warmup_steps=2, lr=3e-3,
                     eval_every=4, eval_batches=2, log_every=1, save_every=2, precision="fp32", quiet=True,
                     seed=0, **overrides)
    vocab = read_manifest(data)["vocab_size"]
    train = TokenWindows(data, "train", 32, batch_size, seed=0)
    val = TokenWindows(data, "val", 32, batch_size, shuffle=False)
    return Trainer(tiny_model(vocab, dropout=dropout), train, val, cfg, saver=saver, callbacks=callbacks, dist=dist,
                   device=torch.device("cpu"))


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------
# pieces


def test_linear_cross_entropy_equals_cross_entropy_with_its_gradients():
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    y[::5] = -100
    ref = F.cross_entropy(h @ w.t() + b, y, ignore_index=-100, reduction="sum")
    ref_grads = torch.autograd.grad(ref * 0.3, (h, w, b))
    ours = linear_cross_entropy(h, w, b, y, chunk=8)  # several chunks, the last one short
    grads = torch.autograd.grad(ours * 0.3, (h, w, b))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # evaluation takes the path without gradients
        torch.testing.assert_close(linear_cross_entropy(h, w, None, y), F.cross_entropy(h @ w.t(), y, reduction="sum"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls, fp32 softmax, fp32 gradients out
        low = linear_cross_entropy(h, w, b, y, chunk=8)
        low_grads = torch.autograd.grad(low * 0.3, (h, w, b))
    assert low.dtype == torch.float32 and all(g.dtype == torch.float32 for g in low_grads)
    torch.testing.assert_close(low, ref, rtol=2e-2, atol=0.0)
    for g, r in zip(low_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0.0, atol=5e-2 * r.abs().max().item())


def test_loss_is_the_mean_over_counted_tokens_however_the_batch_is_split(pydocs):
    """Sum/count normalisation: one batch of 4 == 2 micro-batches of 2, even with masked labels."""
    vocab = read_manifest(pydocs)["vocab_size"]
    batch = TokenWindows(pydocs, "train", 32, 4, seed=3).batch(0)
    batch["labels"][0, :20] = -100  # uneven masking, as in SFT
    model = tiny_model(vocab, dropout=0.0)
    loss, n = next_token_loss(model, batch)
    parts = [next_token_loss(model, {k: v[i:i + 2] for k, v in batch.items()}) for i in (0, 2)]
    assert int(n) == 4 * 32 - 20 == sum(int(c) for _, c in parts)
    torch.testing.assert_close(loss / n, sum(s for s, _ in parts) / n)
    logits = model(batch["input_ids"])
    torch.testing.assert_close(loss / n, F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()))


def test_schedule_and_weight_decay_groups():
    cfg = LoopConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half-way through the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)
    model = tiny_model(64)
    opt = make_optimizer(model.parameters(), cfg, torch.device("cpu"))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim >= 2), name
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))  # tied weight once


# ---------------------------------------------------------------------------------------------------------
# resume


def test_resume_is_bit_identical(pydocs, tmp_path):
    full = make_trainer(pydocs, tmp_path / "full")
    full.fit()
    first = make_trainer(pydocs, tmp_path / "split", stop_at_step=3)  # stops between checkpoints 2 and 4
    assert first.fit()["stopped"]
    second = make_trainer(pydocs, tmp_path / "split", resume=True)
    second.fit()
    assert second.step == full.step == 8
    for k, v in weights(full).items():
        assert torch.equal(v, weights(second)[k]), k
    assert losses(tmp_path / "split") == losses(tmp_path / "full")  # the same curve, every step logged once
    assert sorted(losses(tmp_path / "full")) == list(range(1, 9))


def _killed_run(data: str, out: str, mode: str) -> None:
    """Run in a subprocess: SIGKILL itself after step 5 (between checkpoints 4 and 6), or mid-save at step 6."""

    class DyingSaver:
        def __init__(self, inner):
            self.inner = inner

        def save(self, model, path):
            self.inner.save(model, path)
            if mode == "mid-save" and "last" in path.name:  # model written, trainer state not yet
                os.kill(os.getpid(), signal.SIGKILL)

        def load(self, model, path):
            self.inner.load(model, path)

    def die_after_5(trainer, event, record):
        if mode == "after-5" and event == "step" and record["step"] == 5:
            os.kill(os.getpid(), signal.SIGKILL)

    from gptlab.train.savers import HFSaver

    t = make_trainer(Path(data), Path(out), saver=DyingSaver(HFSaver()), callbacks=[die_after_5], resume=True)
    t.fit()


def test_resume_after_sigkill_is_bit_identical(pydocs, tmp_path):
    full = make_trainer(pydocs, tmp_path / "full")
    full.fit()
    out = tmp_path / "killed"
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_train; "
            f"test_train._killed_run({str(pydocs)!r}, {str(out)!r}, sys.argv[1])")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count as the in-process runs
    for mode, last_step in (("after-5", 4), ("mid-save", 4)):
        proc = subprocess.run([sys.executable, "-c", code, mode], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        state = json.loads((out / "last" / "trainer" / "state.json").read_text())
        assert state["step"] == last_step  # the kill mid-save left the previous checkpoint in place
    assert list(out.glob(".last.tmp-*"))  # the half-written checkpoint is only a hidden staging dir
    resumed = make_trainer(pydocs, out, resume=True)
    resumed.fit()
    assert not list(out.glob(".*.tmp-*"))
    for k, v in weights(full).items():
        assert torch.equal(v, weights(resumed)[k]), k
    assert losses(out) == losses(tmp_path / "full")


def test_hooks_parameters_metrics_early_stopping_and_keep_best(pydocs, tmp_path):
    """Only the given parameters move; metrics_fn's values drive best/ and early stopping; callbacks see events."""
    vocab = read_manifest(pydocs)["vocab_size"]
    model = tiny_model(vocab, dropout=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = list(model.blocks[0].mlp.parameters())
    scores = iter([1.0, 3.0, 2.0, 2.5, 0.5, 9.0])  # best at the 2nd evaluation, then 2 without a new best
    events = []
    cfg = LoopConfig(out_dir=str(tmp_path / "hooks"), max_steps=40, batch_size=2, warmup_steps=1, eval_every=2,
                     eval_batches=1, precision="fp32", quiet=True, best_metric="score", maximize=True, patience=2)
    trainer = Trainer(model, TokenWindows(pydocs, "train", 32, 2), TokenWindows(pydocs, "val", 32, 2, shuffle=False),
                      cfg, parameters=trained, metrics_fn=lambda m, val, t: {"score": next(scores)},
                      callbacks=[lambda t, event, record: events.append((event, record["step"]))],
                      device=torch.device("cpu"))
    trainer.fit()
    assert trainer.step == 8 and trainer.best == 3.0  # stopped early: evaluations at 2, 4 (best), 6, 8
    assert [s for e, s in events if e == "eval"] == [2, 4, 6, 8]  # no second evaluation of step 8 at the end
    assert [s for e, s in events if e == "step"] == list(range(1, 9))
    ids = {id(p) for p in trained}
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (id(p) in ids), name
    from gptlab import load

    best = load(tmp_path / "hooks" / "best")  # the weights after step 4: neither the initial nor the final ones
    assert not torch.equal(best.blocks[0].mlp.fc.weight, model.blocks[0].mlp.fc.weight)
    assert not torch.equal(best.blocks[0].mlp.fc.weight, before["blocks.0.mlp.fc.weight"])


# ---------------------------------------------------------------------------------------------------------
# distributed


def _ddp_worker(rank: int, port: int, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from gptlab.train.runtime import init_distributed

    dist = init_distributed(torch.device("cpu"))
    try:
        t = make_trainer(Path(data), Path(out), batch_size=2, dist=dist, dropout=0.0)
        t.fit()
        if rank == 0:
            torch.save(t.model.state_dict(), Path(out) / "weights.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(pydocs, tmp_path):
    import torch.multiprocessing as mp

    port = free_port()
    mp.spawn(_ddp_worker, args=(port, str(pydocs), str(tmp_path / "ddp")), nprocs=2, join=True)
    # 2 processes x 2 = 4 sequences per step; no dropout, whose masks differ by process
    single = make_trainer(pydocs, tmp_path / "one", batch_size=4, dropout=0.0)
    single.fit()
    ddp, one = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert sorted(ddp) == sorted(one) == list(range(1, 9))
    for step in one:
        assert abs(ddp[step] - one[step]) < 1e-5, (step, ddp[step], one[step])
    ddp_weights = torch.load(tmp_path / "ddp" / "weights.pt", weights_only=True)
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(ddp_weights[k], v, rtol=1e-4, atol=1e-5)
    # both wrote a resumable checkpoint; the DDP one records its world size
    assert json.loads((tmp_path / "ddp" / "last" / "trainer" / "state.json").read_text())["world"] == 2


# ---------------------------------------------------------------------------------------------------------
# it learns


def test_training_beats_the_unigram_entropy_on_python_docs(pydocs, tmp_path, tiny_tokenizer):
    """300 steps of 16 x 64 tokens (~300k tokens, ~15 s on one core) with a 2-layer, 64-wide model.

    The unigram entropy is the loss of the best model that ignores context; a model that learned to use
    context must get well below it. We ask for 1 nat (a 2.7x lower perplexity)."""
    vocab = read_manifest(pydocs)["vocab_size"]
    train_ids = np.concatenate([np.fromfile(pydocs / s["file"], dtype=np.uint16)
                                for s in read_manifest(pydocs)["splits"]["train"]["shards"]])
    p = np.bincount(train_ids, minlength=vocab) / len(train_ids)
    unigram = float(-(p[p > 0] * np.log(p[p > 0])).sum())  # nats per token
    torch.manual_seed(0)
    model = GPT(Config(n_layer=2, n_head=2, n_embd=64, context_length=64, vocab_size=vocab))
    cfg = LoopConfig(out_dir=str(tmp_path / "run"), max_steps=300, batch_size=16, lr=3e-3, min_lr=3e-4,
                     warmup_steps=20, eval_every=0, eval_batches=8, log_every=50, precision="fp32", quiet=True,
                     keep_best=False)
    trainer = Trainer(model, TokenWindows(pydocs, "train", 64, 16, seed=0),
                      TokenWindows(pydocs, "val", 64, 16, shuffle=False), cfg, device=torch.device("cpu"))
    before = trainer.evaluate()["val_loss"]
    after = trainer.fit()["val_loss"]
    assert before > unigram  # random init is worse than unigram statistics
    assert after < unigram - 1.0, (after, unigram)

    # the trained model's perplexity with integer weights, as `gptlab eval --quantize` measures it
    import gptlab
    from gptlab.eval.tasks import evaluate

    gptlab.save(model, tmp_path / "model", tokenizer=tiny_tokenizer)
    val = TokenWindows(pydocs, "val", 64, 1, shuffle=False)
    text = tmp_path / "val.txt"
    text.write_text(tiny_tokenizer.decode([int(t) for t in np.concatenate([np.asarray(s) for s in val.shards])]))
    ppl = {q: evaluate(str(tmp_path / "model"), "perplexity", str(text), quantize=q, progress=False,
                       window=[64]).metrics["token_perplexity"] for q in (None, "int8", "int4")}
    assert abs(ppl["int8"] / ppl[None] - 1) < 0.01, ppl
    assert abs(ppl["int4"] / ppl[None] - 1) < 0.05, ppl

    # and on the decode path: one token per forward through a KV cache, so every product is quant.c's few-row
    # kernel (whose int8 rounds the activations too on AVX512-VNNI CPUs)
    from gptlab.models.kvcache import DenseCache

    ids = torch.tensor(np.asarray(val.shards[0][:200], dtype=np.int64))  # 200 tokens: 3 windows of 64 + 8
    decode = {}
    for q in (None, "int8", "int4"):
        m = gptlab.load(tmp_path / "model", quantize=q)
        nll = []
        with torch.no_grad():
            for start in range(0, len(ids) - 1, 64):
                window = ids[start:start + 65]
                cache = DenseCache.for_model(m, 1, 64)
                logits = torch.cat([m(window[None, i:i + 1], cache=cache)[0] for i in range(len(window) - 1)])
                nll.append(torch.nn.functional.cross_entropy(logits.float(), window[1:], reduction="none"))
        decode[q] = float(torch.cat(nll).mean().exp())
    assert abs(decode["int8"] / decode[None] - 1) < 0.01, decode
    assert abs(decode["int4"] / decode[None] - 1) < 0.05, decode


# ---------------------------------------------------------------------------------------------------------
# the command


def test_train_command_writes_loadable_models_and_resumes(pydocs, tmp_path, capsys):
    import gptlab

    out = tmp_path / "cli"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data: {pydocs}\nout_dir: {out}\nmax_steps: 6\nbatch_size: 4\nwarmup_steps: 2\n"
                      f"eval_every: 3\neval_batches: 2\nsample_tokens: 8\nprecision: fp32\n"
                      f"model:\n  n_layer: 1\n  n_head: 2\n  n_embd: 32\n  context_length: 32\n")
    assert cli.main(["train", str(recipe), "--stop-at-step", "3"]) == 0
    assert not (out / "final").exists() and (out / "last" / "trainer" / "state.json").is_file()
    assert cli.main(["train", str(recipe), "--resume", "--model.n_embd=64"]) == 1  # a different model: refused
    assert "does not match" in capsys.readouterr().err
    assert cli.main(["train", str(recipe), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "val_bpb" in printed and "sample" in printed
    for name in ("final", "best", "last"):
        model = gptlab.load(out / name)
        assert model.config.model_type == "gpt2" and model.config.vocab_size == read_manifest(pydocs)["vocab_size"]
    assert not (out / "final" / "trainer").exists()  # final/ is a plain model dir: no resume state
    tok = gptlab.load_tokenizer(out / "final")
    assert tok.decode(tok.encode("The with statement")) == "The with statement"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    bpb = [r["val_bpb"] for r in records if "val_bpb" in r]
    assert len(bpb) == 2 and all(math.isfinite(b) and b > 0 for b in bpb)
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_step: 5\n")  # misspelt
    assert cli.main(["train", str(bad)]) == 1
    assert "max_step" in capsys.readouterr().err


def test_recipes_are_valid_train_configs():
    from gptlab.recipe import load_recipe
    from gptlab.train.pretrain import TrainConfig

    recipes = sorted((HERE.parents[1] / "recipes").glob("pretrain-*.yaml")) + [HERE.parents[1] / "recipes" /
                                                                                "speedrun-python-docs.yaml"]
    assert recipes
    for path in recipes:
        load_recipe(TrainConfig, path, {})
