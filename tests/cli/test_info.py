"""CLI commands that describe models: `gptlab models` (the preset table) and `gptlab info`."""

from __future__ import annotations

import json
import re

import pytest

import gptlab
from gptlab.cli import main
from gptlab.models.presets import FAMILIES, PRESETS
from gptlab.models.stats import count_params
from tests.conftest import make_hf_model


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------------------------------------
# gptlab models / info


def test_models_lists_every_preset_once(capsys):
    rc, out, err = run(capsys, "models")
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["name", "family", "model_type", "params"]
    assert [line.split()[0] for line in lines[2:]] == list(PRESETS)
    moe = next(line for line in lines if line.startswith("qwen3-30b-a3b "))
    assert "30.5B (3.4B active)" in moe and "32/4" in moe and "moe 8/128" in moe


def test_models_family_filter(capsys):
    rc, out, _ = run(capsys, "models", "--family", "pythia")
    assert rc == 0
    assert [line.split()[0] for line in out.splitlines()[2:]] == [n for n in PRESETS if FAMILIES[n] == "pythia"]
    rc, out, _ = run(capsys, "models", "--family", "gpt_neox")  # an HF model_type works too
    neox = {line.split()[0] for line in out.splitlines()[2:]}
    assert neox == {"gpt-neox-20b"} | {n for n in PRESETS if FAMILIES[n] == "pythia"}
    rc, out, err = run(capsys, "models", "--family", "llama")
    assert rc == 1 and out == "" and err.count("\n") == 1 and err.startswith("error: no presets of family 'llama'")


def _fields(out: str) -> dict[str, str]:
    """`info` prints "key   value" lines; keys may hold one space ("kv cache"), the gap has two or more."""
    return dict(re.fullmatch(r"(\S+(?: \S+)*)\s{2,}(.*)", line).groups() for line in out.splitlines())


def test_info_preset(capsys):
    rc, out, err = run(capsys, "info", "gpt2")
    assert rc == 0 and err == ""
    f = _fields(out)
    assert f["parameters"].startswith("124,439,808 ")
    assert f["context"] == "1,024 tokens" and f["vocab"] == "50,257"
    # bf16 weights; KV cache = 2 (k, v) x 12 layers x 768 x 1024 tokens x 2 bytes = 36 MiB
    assert f["weights"] == "237.4 MiB in bfloat16"
    assert f["kv cache"] == "36.0 MiB for 1 x 1,024 tokens in bfloat16"


def test_info_model_dir_reads_config_not_weights(capsys, tiny_gpt2_dir):
    rc, out, _ = run(capsys, "info", str(tiny_gpt2_dir))
    assert rc == 0
    f = _fields(out)
    n = gptlab.load(tiny_gpt2_dir).num_params()
    assert f["parameters"].startswith(f"{n:,} ")
    assert f["dtype"] == "float32"
    assert f["tokenizer"] == "tokenizer.json, no chat template"
    assert f["files"].startswith("1 safetensors file(s)")


def test_info_needs_only_config_json(capsys, tmp_path):
    config = make_hf_model("qwen3").config.to_dict()
    config["dtype"] = "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps(config))
    rc, out, _ = run(capsys, "info", str(tmp_path))
    assert rc == 0
    f = _fields(out)
    c = gptlab.formats.hf.read_config(tmp_path)
    assert f["parameters"].startswith(f"{count_params(c)['total']:,} ")
    assert f["weights"].endswith("in bfloat16") and f["files"] == "none" and f["tokenizer"] == "none"


# the tests run with HF_HUB_OFFLINE=1 (conftest), so a hub id that is not cached fails like a missing dir
@pytest.mark.parametrize("arg", ["./no-such-dir", "/no/such/model/dir", "not-a-preset", "no-such-org/no-such-model"])
def test_info_missing_model_is_one_line_error(capsys, tmp_path, arg):
    rc, out, err = run(capsys, "info", arg)
    assert rc == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------------------
# gptlab chat

# a ChatML template with a default system message, as Qwen's templates have
