"""Runs that would train nothing or train wrong stop with one clear line before any work, and a run whose loss
or gradient stops being finite ends before the optimizer writes it into the weights, its checkpoints intact."""

from __future__ import annotations

import pytest
import torch

from gptlab import cli
from tests.cli.test_cli import assert_one_line_error, run


def _recipe(tmp_path, pydocs, **extra):
    fields = {"data": pydocs, "out_dir": tmp_path / "run", "max_steps": 6, "batch_size": 4, "warmup_steps": 0,
              "eval_every": 3, "eval_batches": 2, "sample_tokens": 4, "precision": "fp32", **extra}
    text = "".join(f"{k}: {v}\n" for k, v in fields.items())
    text += "model:\n  n_layer: 1\n  n_head: 2\n  n_embd: 32\n  context_length: 32\n"
    (tmp_path / "r.yaml").write_text(text)
    return str(tmp_path / "r.yaml")


@pytest.mark.parametrize("option, value, says", [
    ("--grad-accum", "0", "grad-accum must be an integer >= 1"),
    ("--max-steps", "-5", "max-steps must be an integer >= 1"),
    ("--batch-size", "0", "batch-size must be an integer >= 1"),
    ("--lr", "nan", "lr must be a finite number > 0"),
    ("--lr", "-1", "lr must be a finite number > 0"),
    ("--beta2", "1.5", "beta2 must be a finite number in [0, 1)"),
    ("--grad-clip", "inf", "grad-clip must be a finite number >= 0"),
])
def test_settings_that_train_nothing_are_refused_before_any_work(capsys, tmp_path, pydocs, option, value, says):
    code, _, err = run(capsys, "train", _recipe(tmp_path, pydocs), option, value)
    assert_one_line_error(code, err, says)
    assert not (tmp_path / "run" / "final").exists()


def test_a_diverging_run_stops_and_saves_no_nan_weights(capsys, tmp_path, pydocs):
    import gptlab

    recipe = _recipe(tmp_path, pydocs, max_steps=40, eval_every=2, lr=1e30, min_lr=0, grad_clip=0)
    code, _, err = run(capsys, "train", recipe)
    assert_one_line_error(code, err, "training stopped before this step changed the weights")
    assert not (tmp_path / "run" / "final").exists()
    for ckpt in ("last", "best"):
        if (tmp_path / "run" / ckpt).exists():
            m = gptlab.load(tmp_path / "run" / ckpt)
            assert all(torch.isfinite(p).all() for p in m.parameters()), ckpt


@pytest.mark.parametrize("args, says", [(["--temperature", "nan"], "temperature must be a finite number"),
                                        (["--temperature", "inf"], "temperature must be a finite number"),
                                        (["--stop", ""], "stop strings must not be empty")])
def test_generate_refuses_values_that_sample_wrong(capsys, tiny_gpt2_dir, args, says):
    code, _, err = run(capsys, "generate", str(tiny_gpt2_dir), "--prompt", "x", *args)
    assert_one_line_error(code, err, says)


def test_the_cli_entry_returns_nonzero_not_a_traceback(tmp_path, pydocs):
    assert cli.main(["train", _recipe(tmp_path, pydocs), "--grad-accum", "0"]) != 0


def test_a_finished_run_is_not_replaced_without_overwrite(capsys, tmp_path, pydocs):
    recipe = _recipe(tmp_path, pydocs, max_steps=2, eval_every=0)
    assert run(capsys, "train", recipe)[0] == 0
    final = tmp_path / "run" / "final" / "model.safetensors"
    before = final.read_bytes()
    code, _, err = run(capsys, "train", recipe)
    assert_one_line_error(code, err, "holds a run", "--resume", "--overwrite")
    assert final.read_bytes() == before
    assert run(capsys, "train", recipe, "--overwrite", "--seed", "7")[0] == 0
    assert final.read_bytes() != before


def test_an_out_dir_of_user_files_is_refused(capsys, tmp_path, pydocs):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "train", _recipe(tmp_path, pydocs, max_steps=2))
    assert_one_line_error(code, err, "not a gptlab run (notes.txt)")
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_a_second_writer_is_refused_at_once_and_a_stale_lock_taken_over(capsys, tmp_path, pydocs):
    import json
    import socket
    import subprocess
    import sys

    (tmp_path / "run").mkdir()
    lock = tmp_path / "run" / ".gptlab.lock"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        code, _, err = run(capsys, "train", _recipe(tmp_path, pydocs, max_steps=2))
        assert_one_line_error(code, err, f"in use by another gptlab run (pid {other.pid}")
        assert json.loads(lock.read_text())["pid"] == other.pid  # the owner's lock is left alone
    finally:
        other.kill()
        other.wait()
    assert run(capsys, "train", _recipe(tmp_path, pydocs, max_steps=2))[0] == 0  # its process is gone: stale
    assert not lock.exists()  # released at the end


@pytest.mark.parametrize("args, says", [(["--val-fraction", "1.5"], "val-fraction must be a finite number in [0, 1)"),
                                        (["--max-len", "-3"], "seq-len must be an integer >= 0"),
                                        (["--lora-r", "0"], "lora-r must be an integer >= 1"),
                                        (["--lora-dropout", "1"], "lora-dropout must be a finite number in [0, 1)")])
def test_finetune_values_that_train_wrong_are_refused(capsys, tmp_path, tiny_gpt2_dir, args, says):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    code, _, err = run(capsys, "finetune", str(tiny_gpt2_dir), "--data", str(tmp_path / "d.jsonl"),
                       "--out-dir", str(tmp_path / "ft"), *args)
    assert_one_line_error(code, err, says)
    assert not (tmp_path / "ft").exists()


def test_chat_with_a_bad_reply_length_ends_with_one_error(capsys, tmp_path, tiny_gpt2_dir, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    code, _, err = run(capsys, "chat", str(tiny_gpt2_dir), "--plain", "--max-new-tokens", "-1")
    assert_one_line_error(code, err, "max-new-tokens must be an integer >= 1")


@pytest.mark.parametrize("device, says", [("cuda", "CUDA is not available"), ("gpu", "unknown device 'gpu'")])
def test_a_device_that_is_not_here_is_one_error(capsys, tiny_gpt2_dir, device, says):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run(capsys, "generate", str(tiny_gpt2_dir), "--prompt", "x", "--device", device)
    assert_one_line_error(code, err, says)


def test_a_tokenizer_bigger_than_the_model_is_named(capsys, tmp_path, tiny_tokenizer):
    from tests.conftest import make_hf_model, save_hf_model

    small = make_hf_model("gpt2", vocab_size=300, n_positions=256, bos_token_id=0, eos_token_id=0)
    save_hf_model(small, tmp_path / "m", tiny_tokenizer)  # a 512-token tokenizer on a 300-token model
    code, _, err = run(capsys, "generate", str(tmp_path / "m"), "--prompt", "The with statement is used to wrap")
    assert_one_line_error(code, err, "outside the model's vocabulary of 300", "does not belong to this model")


def test_truncate_cannot_make_room_that_max_new_tokens_took(capsys, tiny_gpt2_dir):
    code, _, err = run(capsys, "generate", str(tiny_gpt2_dir), "--prompt", "x y z", "--max-new-tokens", "1000",
                       "--truncate")
    assert_one_line_error(code, err, "leaves no room for the prompt", "at most 127 new tokens")


def test_the_closing_sample_fits_a_short_context(capsys, tmp_path, pydocs):
    recipe = _recipe(tmp_path, pydocs, max_steps=2, eval_every=0, sample_tokens=120)  # context 32
    code, out, err = run(capsys, "train", recipe)
    assert code == 0, err
    assert "sample shortened to" in out and "--- sample ---" in out


def test_info_flags_a_tokenizer_bigger_than_the_model(capsys, tmp_path, tiny_tokenizer):
    from tests.conftest import make_hf_model, save_hf_model

    save_hf_model(make_hf_model("gpt2", vocab_size=300, n_positions=64), tmp_path / "m", tiny_tokenizer)
    code, out, _ = run(capsys, "info", str(tmp_path / "m"))
    assert code == 0 and "WARNING: 512 token ids but the model has 300" in out


@pytest.mark.parametrize("damage, says", [
    ("optimizer.pt", "optimizer.pt cannot be read"),
    ("state.json", "state.json is not valid JSON"),
    ("step", "'step' is missing or not a number"),
    ("rng-0.pt", "rng-0.pt is missing"),
])
def test_a_damaged_checkpoint_is_named_file_by_file(capsys, tmp_path, pydocs, damage, says):
    import json

    recipe = _recipe(tmp_path, pydocs, max_steps=4, eval_every=2)
    assert run(capsys, "train", recipe, "--stop-at-step", "2")[0] == 0
    trainer = tmp_path / "run" / "last" / "trainer"
    if damage == "optimizer.pt":
        data = (trainer / "optimizer.pt").read_bytes()
        (trainer / "optimizer.pt").write_bytes(data[: len(data) // 2])
    elif damage == "state.json":
        (trainer / "state.json").write_text("{not json")
    elif damage == "step":
        state = json.loads((trainer / "state.json").read_text())
        (trainer / "state.json").write_text(json.dumps({**state, "step": "four"}))
    else:
        (trainer / "rng-0.pt").unlink()
    code, _, err = run(capsys, "train", recipe, "--resume")
    assert_one_line_error(code, err, says)


def _nan_at(calls: set[int]):
    """A next-token loss that is NaN on the given (1-based) calls."""
    from gptlab.train.losses import next_token_loss

    seen = {"n": 0}

    def loss(model, batch):
        seen["n"] += 1
        total, count = next_token_loss(model, batch)
        return (total * float("nan") if seen["n"] in calls else total), count

    return loss


def _tiny_trainer(tmp_path, loss_fn, **cfg):
    from gptlab import GPT, Config
    from gptlab.data.examples import Collate, ExampleBatches
    from gptlab.train.loop import LoopConfig, Trainer

    torch.manual_seed(0)
    model = GPT(Config(vocab_size=50, n_layer=1, n_head=2, n_embd=16, context_length=16))
    rows = [(list(range(i, i + 8)), list(range(i + 1, i + 9))) for i in range(20)]
    data = ExampleBatches(rows, 4, Collate(0), seed=0)
    config = LoopConfig(out_dir=str(tmp_path / "run"), max_steps=6, eval_every=0, precision="fp32", quiet=True,
                        warmup_steps=0, keep_best=False, **cfg)
    return Trainer(model, data, None, config, loss_fn=loss_fn, saver=_NoSave())


class _NoSave:
    def save(self, model, path):
        path.mkdir(parents=True, exist_ok=True)
        torch.save({}, path / "empty.pt")

    def load(self, model, path):
        pass


def test_non_finite_steps_are_skipped_up_to_the_limit_then_stop(tmp_path, capsys):
    from gptlab.errors import GptlabError

    trainer = _tiny_trainer(tmp_path / "a", _nan_at({2, 4}), skip_nonfinite=2)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.fit()
    assert trainer.step == 6 and trainer.skipped_steps == 2 and "skipped" not in metrics
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    import json

    records = [json.loads(line) for line in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_steps"]) for r in records if "skipped_nonfinite" in r] == [(2, 1), (4, 2)]

    trainer = _tiny_trainer(tmp_path / "b", _nan_at({2, 4}), skip_nonfinite=1)
    with pytest.raises(GptlabError, match=r"step 4: the loss is nan after skipping 1 such step"):
        trainer.fit()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_two_processes_on_one_out_dir_the_second_refused_at_once_the_first_unaffected(tmp_path, pydocs):
    """Real processes: B is refused while A trains; A goes on; A SIGKILLed leaves a stale lock that a
    --resume takes over, continuing A's run from its last checkpoint."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    recipe = _recipe(tmp_path, pydocs, max_steps=100000, eval_every=0, save_every=20, log_every=5)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "gptlab", "train", recipe]
    a = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    run_dir = tmp_path / "run"
    try:
        deadline = time.time() + 120
        while not (run_dir / "last" / "trainer" / "state.json").is_file():  # A is training and has saved
            assert a.poll() is None and time.time() < deadline, a.stderr.read() if a.poll() is not None else "slow"
            time.sleep(0.1)
        t0 = time.perf_counter()
        b = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        assert b.returncode == 1
        err = b.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and f"in use by another gptlab run (pid {a.pid}" in err[0]
        assert "Traceback" not in b.stderr
        refused_in = time.perf_counter() - t0
        steps_then = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        time.sleep(1.0)
        assert a.poll() is None  # A is unaffected: still training,
        steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(steps) and len(set(steps)) == len(steps)  # one run's records, in order
        assert len(steps) >= len(steps_then)
        assert refused_in < 30  # refused before any training (the time is Python's start-up)
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
    lock = json.loads((run_dir / ".gptlab.lock").read_text())
    assert lock["pid"] == a.pid  # left behind by the killed process: stale
    resumed_from = json.loads((run_dir / "last" / "trainer" / "state.json").read_text())["step"]
    c = subprocess.run(cmd + ["--resume", "--max-steps", str(resumed_from + 5)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert c.returncode == 0, c.stderr[-2000:]
    assert "resumed from" in c.stdout and f"at step {resumed_from}" in c.stdout
    assert (run_dir / "final").is_dir() and not (run_dir / ".gptlab.lock").exists()


def test_an_existing_run_dir_keeps_its_permissions(capsys, tmp_path, pydocs):
    import os
    import stat

    (tmp_path / "run").mkdir()
    os.chmod(tmp_path / "run", 0o750)
    recipe = _recipe(tmp_path, pydocs, max_steps=2, eval_every=0)
    assert run(capsys, "train", recipe)[0] == 0
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o750
    os.chmod(tmp_path / "run" / "final", 0o755)
    assert run(capsys, "train", recipe, "--overwrite")[0] == 0
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o750
