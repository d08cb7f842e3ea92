"""The CLI: every bad input ends in one `error:` line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
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
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (path / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(capsys, "generate", str(path), "--prompt", "x")
    assert_one_line_error(code, err, "rope_type='yarn'")


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
    assert_one_line_error(code, err, "top_p")


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
