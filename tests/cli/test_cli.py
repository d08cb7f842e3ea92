"""The CLI: every bad input ends in one `error:` line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gptlab.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.startswith("error:") or "error:" in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


@pytest.fixture
def model_copy(tmp_path, tiny_gpt2_dir) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(tiny_gpt2_dir, dest)
    return dest


def test_generate_runs_and_echoes_the_prompt(capsys, tiny_gpt2_dir):
    code, out, _ = run(capsys, "generate", str(tiny_gpt2_dir), "--prompt", "The with statement",
                       "--max-new-tokens", "8")
    assert code == 0
    assert out.startswith("The with statement")


def test_generate_stream_prints_the_same_text_as_batch(capsys, tiny_gpt2_dir):
    args = ("generate", str(tiny_gpt2_dir), "--prompt", "import", "--max-new-tokens", "12", "--seed", "5")
    _, batch, _ = run(capsys, *args)
    _, streamed, _ = run(capsys, *args, "--stream")
    assert streamed == batch


def test_missing_dir(capsys, tmp_path):
    code, _, err = run(capsys, "generate", str(tmp_path / "nope"), "--prompt", "x")
    assert_one_line_error(code, err, "does not exist")


def test_offline_hub_id_names_the_id_and_the_way_out(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(capsys, "generate", "someone/some-model", "--prompt", "x")
    assert_one_line_error(code, err, "someone/some-model", "local directory")


def test_missing_safetensors(capsys, model_copy):
    (model_copy / "model.safetensors").unlink()
    code, _, err = run(capsys, "generate", str(model_copy), "--prompt", "x")
    assert_one_line_error(code, err, "model.safetensors")


def test_truncated_safetensors(capsys, model_copy):
    f = model_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    code, _, err = run(capsys, "generate", str(model_copy), "--prompt", "x")
    assert_one_line_error(code, err, "model.safetensors")


def test_pickled_weights_are_refused_not_loaded(capsys, model_copy):
    (model_copy / "model.safetensors").rename(model_copy / "pytorch_model.bin")
    code, _, err = run(capsys, "generate", str(model_copy), "--prompt", "x")
    assert_one_line_error(code, err, "safetensors")


def test_unknown_architecture(capsys, model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (model_copy / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(capsys, "generate", str(model_copy), "--prompt", "x")
    assert_one_line_error(code, err, "model_type='mamba'")


def test_unsupported_rope_scaling_names_the_field(capsys, tmp_path):
    from tests.conftest import make_hf_model, save_hf_model

    path = save_hf_model(make_hf_model("qwen2"), tmp_path / "q")
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0}  # yarn etc. load
    (path / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(capsys, "generate", str(path), "--prompt", "x")
    assert_one_line_error(code, err, "rope_parameters rope_type='longrope' is not supported")


def test_shape_mismatch_between_config_and_weights(capsys, model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["n_embd"] = 60  # the weights are 48 wide
    cfg["n_head"] = 3
    (model_copy / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(capsys, "generate", str(model_copy), "--prompt", "x")
    assert_one_line_error(code, err, "shape mismatch")


def test_malformed_config_json(capsys, model_copy):
    (model_copy / "config.json").write_text("{not json")
    code, _, err = run(capsys, "generate", str(model_copy), "--prompt", "x")
    assert_one_line_error(code, err, "config.json")


@pytest.mark.parametrize("option,value", [("--max-new-tokens", "ten"), ("--temperature", "hot"), ("--top-k", "1.5")])
def test_non_numeric_option_values(capsys, tiny_gpt2_dir, option, value):
    code, _, err = run(capsys, "generate", str(tiny_gpt2_dir), "--prompt", "x", option, value)
    assert_one_line_error(code, err, value)


def test_out_of_range_option_values(capsys, tiny_gpt2_dir):
    code, _, err = run(capsys, "generate", str(tiny_gpt2_dir), "--prompt", "x", "--top-p", "2")
    assert_one_line_error(code, err, "top-p")


def test_help_comes_from_docstrings(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "nucleus sampling" in out and "--max-new-tokens" in out


def test_console_script_prints_no_traceback(tmp_path):
    """The installed entry point itself: a missing dir is one stderr line and exit status 1."""
    exe = Path(sys.executable).with_name("gptlab")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "gptlab.cli"]
    proc = subprocess.run(cmd + ["generate", str(tmp_path / "missing"), "--prompt", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error:"), proc.stderr


# ---------------------------------------------------------------------------------------------------------
# --help: one spelling per option, in groups, fitting a screen


def _help(capsys, monkeypatch, *command: str) -> str:
    monkeypatch.setenv("COLUMNS", "80")  # what a pipe (`gptlab train --help | less`) gets
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command,limit", [(("train",), 71), (("finetune",), 96), (("eval",), 66)])  # finetune: +22 for dpo, grpo, distill
def test_help_fits_a_screen_with_one_spelling_per_option(capsys, monkeypatch, command, limit):
    out = _help(capsys, monkeypatch, *command)
    assert len(out.splitlines()) <= limit, out
    flags = re.findall(r"(?<![\w-])--[\w.-]+", out)
    assert not [f for f in flags if "_" in f], "underscore spellings are accepted, not listed"
    assert flags.count("--seq-len") <= 1 and flags.count("--max-new-tokens") <= 1  # renamed options listed once


def test_train_help_groups_options_and_leaves_out_what_the_run_sets(capsys, monkeypatch):
    out = _help(capsys, monkeypatch, "train")
    assert "training loop:" in out and "data and run:" in out and "model (every Config field" in out
    for hidden in ("--model.vocab-size", "--model.name", "--model.hf-repo", "--model.eos-token-id"):
        assert hidden not in out
    assert "--model.n-layer" in out and "--model.qk-norm" not in out  # listed few, accepted all (docs list them)


def test_underscore_spellings_and_earlier_names_are_still_read(tmp_path):
    from gptlab import recipe
    from gptlab.cli.args import normalise_argv
    from gptlab.train.finetune import FinetuneConfig

    renamed = {k.replace("_", "-"): v.replace("_", "-") for k, v in recipe.renamed(FinetuneConfig).items()}
    argv = normalise_argv(["finetune", "m", "--max_len=12", "--lora_r", "4", "--", "--x_y"], renamed)
    assert argv == ["finetune", "m", "--seq-len=12", "--lora-r", "4", "--", "--x_y"]
    yaml = tmp_path / "r.yaml"
    yaml.write_text("task: classify\nmax_len: 32\n")
    cfg = recipe.load_recipe(FinetuneConfig, yaml, {})
    assert (cfg.task, cfg.seq_len) == ("classification", 32)
    assert FinetuneConfig(task="classify").task == "classification"
    from gptlab.train.pretrain import TrainConfig

    assert recipe.load_recipe(TrainConfig, None, {"model.block_size": 64}).model.context_length == 64


def test_fields_the_run_sets_are_refused_with_the_reason(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--model.vocab_size=77", "--out-dir", str(tmp_path))
    assert_one_line_error(code, err, "vocab_size", "comes from the data")
    yaml = tmp_path / "r.yaml"
    yaml.write_text("model:\n  eos_token_id: 3\n")
    code, _, err = run(capsys, "train", str(yaml), "--out-dir", str(tmp_path))
    assert_one_line_error(code, err, "eos_token_id", "tokenizer")


def test_classify_is_accepted_for_classification_everywhere(capsys, tiny_gpt2_dir, tmp_path):
    rows = tmp_path / "c.jsonl"
    rows.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in
                            [("good film", "pos"), ("bad film", "neg")] * 4))
    code, out, err = run(capsys, "eval", str(tiny_gpt2_dir), "--task", "classify", "--data", str(rows),
                         "--no-progress")
    assert code == 0, err
    assert "classification" in out


def test_generate_takes_a_json_schema_file_and_choices(capsys, tiny_gpt2_dir, tmp_path):
    import jsonschema

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "k": {"enum": ["a", "b", "中"]}},
              "required": ["n", "k"], "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema), encoding="utf-8")
    code, out, _ = run(capsys, "generate", str(tiny_gpt2_dir), "--prompt", "x", "--no-echo", "--temperature", "1",
                       "--json-schema", str(tmp_path / "s.json"), "--max-new-tokens", "60")
    assert code == 0
    jsonschema.validate(json.loads(out), schema)
    code, out, _ = run(capsys, "generate", str(tiny_gpt2_dir), "--prompt", "x", "--no-echo", "--num-samples", "3",
                       "--choice", "yes", "no")
    assert code == 0 and {line for line in out.splitlines() if not line.startswith("---")} <= {"yes", "no"}


@pytest.mark.parametrize("args, says", [
    (["--regex", "a", "--choice", "a"], "one output constraint"),
    (["--json-schema", "/nonexistent/s.json"], "cannot read"),
    (["--regex", "(open"], "cannot be compiled"),
])
def test_generate_constraint_errors(capsys, tiny_gpt2_dir, args, says):
    code, _, err = run(capsys, "generate", str(tiny_gpt2_dir), "--prompt", "x", *args)
    assert_one_line_error(code, err, says)
