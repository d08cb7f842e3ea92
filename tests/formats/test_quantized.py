"""`gptlab export --format int8|int4`: gptlab's quantized model dirs (gptlab/formats/quantized.py).

Reopening one gives the model `gptlab.load(original, quantize=...)` gives, bit for bit (the same integers and
scales, the same logits); the commands that take a model run on it; transformers refuses it; its weights file is
a fraction of fp32's; quantizing it again, another dtype, training, LoRA and damaged files get one clear error.
"""

from __future__ import annotations

import io
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import gptlab
from gptlab import cli
from gptlab.errors import GptlabError
from gptlab.models.quant import QuantLinear
from tests.conftest import make_hf_model, save_hf_model

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {
    # Conv1D rows stored (in, out) and a tied head; 48 wide, so under int4 most layers fall back to int8
    "gpt2": dict(n_layer=2, n_embd=48, n_head=3, n_positions=128),
    # q/k/v fused per head, reordered on load: the integers and scales must follow the same rows
    "gpt_neox": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                     max_position_embeddings=128, rotary_pct=0.25),
    # split q/k/v and gate/up, a shared expert (quantized) beside routed experts and routers (kept float)
    "qwen2_moe": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                      num_experts=4, num_experts_per_tok=2, max_position_embeddings=128, tie_word_embeddings=True),
}
PROMPT = "The with statement"


@pytest.fixture(scope="module", params=list(CASES))
def source(request, tmp_path_factory, tiny_tokenizer):
    family = request.param
    hf = make_hf_model(family, seed=1, vocab_size=tiny_tokenizer.vocab_size, bos_token_id=0, eos_token_id=0,
                       **CASES[family])
    return save_hf_model(hf, tmp_path_factory.mktemp(family) / "model", tiny_tokenizer)


def _export(src, kind, out) -> None:
    assert cli.main(["export", str(src), "--format", kind, "-o", str(out)]) == 0


def _integers(model) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    return {n: (m.kind, m.qweight, m.scales) for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_the_dir_reopens_as_the_quantized_model_bit_for_bit(source, kind, tmp_path):
    out = tmp_path / kind
    _export(source, kind, out)
    ref, got = gptlab.load(source, quantize=kind), gptlab.load(out)
    assert got.quantization == kind and not any(p.requires_grad for p in got.parameters())
    a, b = _integers(ref), _integers(got)
    assert a.keys() == b.keys() and "lm_head" in b
    for name, (k, q, s) in a.items():
        assert b[name][0] == k and torch.equal(b[name][1], q) and torch.equal(b[name][2], s), name
    ids = torch.randint(0, ref.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # a prefill (dequantize + GEMM) and single rows (quant.c where it runs)
        assert torch.equal(ref(ids), got(ids))
        assert torch.equal(ref(ids[:1, :1]), got(ids[:1, :1]))

    cfg = json.loads((out / "config.json").read_text())
    block = cfg["quantization_config"]
    assert cfg["model_type"] == f"gptlab_{kind}" and block["model_type"] == ref.config.model_type
    assert (block["quant_method"], block["bits"], block["group_size"]) == ("gptlab", 8 if kind == "int8" else 4,
                                                                          None if kind == "int8" else 32)
    assert block["modules"] == {n: k for n, (k, _, _) in a.items()}
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]  # nothing pickled
    dtypes: dict[str, set[str]] = {}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for k in f.keys():
            dtypes.setdefault(k.rsplit(".", 1)[-1], set()).add(f.get_slice(k).get_dtype())
            if k.endswith(".qweight"):  # rows are output channels, in every family (GPT-2's Conv1D too)
                assert f.get_slice(k).get_shape()[0] == f.get_slice(k.replace("qweight", "scales")).get_shape()[0]
    assert dtypes["qweight"] == ({"I8"} if kind == "int8" else dtypes["qweight"] & {"I8", "U8"}) and \
        (kind == "int8" or "U8" in dtypes["qweight"])  # int4: nibbles (a few odd-width layers int8)
    assert dtypes["scales"] == {"F32"} and dtypes["weight"] == {"F32"}  # norms and embeddings stay float


def test_the_commands_that_take_a_model_run_on_it(source, tmp_path, capsys, monkeypatch):
    out = tmp_path / "int8"
    _export(source, "int8", out)
    capsys.readouterr()
    gen = ["--prompt", PROMPT, "--max-new-tokens", "6", "--temperature", "0"]
    assert cli.main(["generate", str(out), *gen]) == 0
    mine = capsys.readouterr().out
    assert cli.main(["generate", str(source), "--quantize", "int8", *gen]) == 0
    assert capsys.readouterr().out == mine and mine.startswith(PROMPT)
    assert cli.main(["generate", str(out), "--quantize", "int8", *gen]) == 0  # its own scheme: a no-op
    assert capsys.readouterr().out == mine

    text = tmp_path / "val.txt"
    text.write_text("The with statement wraps a block of code in the methods of a context manager. " * 8)
    ppl = []
    for argv in (["eval", str(out)], ["eval", str(source), "--quantize", "int8"]):
        assert cli.main([*argv, "--task", "perplexity", "--data", str(text), "--no-progress"]) == 0
        ppl.append([line for line in capsys.readouterr().out.splitlines() if "perplexity" in line])
    assert ppl[0] == ppl[1] and ppl[0]

    chats = []
    for argv in (["chat", str(out)], ["chat", str(source), "--quantize", "int8"]):
        monkeypatch.setattr("sys.stdin", io.StringIO("What is a tuple?\n"))
        assert cli.main([*argv, "--plain", "--max-new-tokens", "5", "--temperature", "0"]) == 0
        chats.append(capsys.readouterr().out)
    assert chats[0] == chats[1] and chats[0].strip()

    assert cli.main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "quantized    int8 weights, one scale per output channel" in info
    assert f"model_type   {gptlab.load(out).config.model_type}" in info

    import httpx

    from gptlab.serve.app import ServeConfig, create_app
    from tests.serve.conftest import running

    model, tok = gptlab.load(out), gptlab.load_tokenizer(out)
    with running(create_app(ServeConfig(model="q"), model, tok)) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "q", "prompt": PROMPT, "max_tokens": 6,
                                                      "temperature": 0}, timeout=60)
    assert r.status_code == 200 and PROMPT + r.json()["choices"][0]["text"] == mine.rstrip("\n")


def test_transformers_refuses_it(tiny_gpt2_dir, tmp_path):
    import transformers

    out = tmp_path / "int4"
    _export(tiny_gpt2_dir, "int4", out)
    # transformers only warns about a quant_method it does not know, and would load the float layers random:
    # the dir's model_type stops it first
    with pytest.raises(ValueError, match="model type `gptlab_int4` but Transformers does not recognize"):
        transformers.AutoModelForCausalLM.from_pretrained(out)


def test_the_weights_file_is_a_fraction_of_fp32(tmp_path, tiny_tokenizer):
    # linear layers hold most weights here (as in models past ~1B parameters); the embedding stays fp32
    hf = make_hf_model("gpt_neox", vocab_size=tiny_tokenizer.vocab_size, num_hidden_layers=2, hidden_size=256,
                       num_attention_heads=4, intermediate_size=1024, max_position_embeddings=128)
    src = save_hf_model(hf, tmp_path / "fp32", tiny_tokenizer)
    size = {"fp32": (src / "model.safetensors").stat().st_size}
    for kind in ("int8", "int4"):
        _export(src, kind, tmp_path / kind)
        size[kind] = (tmp_path / kind / "model.safetensors").stat().st_size
    # measured: int8 0.31, int4 0.22 of fp32, fixed by the shapes (the linear layers alone: 0.25 and 0.16)
    assert size["int8"] < 0.32 * size["fp32"] and size["int4"] < 0.23 * size["fp32"], size


def test_quantizing_again_another_dtype_training_and_lora_are_refused(tiny_gpt2_dir, tmp_path, capsys):
    out = tmp_path / "int8"
    _export(tiny_gpt2_dir, "int8", out)
    capsys.readouterr()
    for argv in (["--format", "int4", "-o", str(tmp_path / "again")], ["-o", str(tmp_path / "m.gguf")]):
        assert cli.main(["export", str(out), *argv]) == 1
        assert "already holds int8 weights" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]
    same = gptlab.load(out, quantize="int8")  # what it already is: a no-op
    assert all(torch.equal(same.get_submodule(n).qweight, q) for n, (_, q, _) in _integers(gptlab.load(out)).items())
    with pytest.raises(GptlabError, match="round the rounded values again"):
        gptlab.load(out, quantize="int4")
    with pytest.raises(GptlabError, match="loads only as that dtype"):
        gptlab.load(out, dtype="bfloat16")
    assert gptlab.load(out, dtype="float32").quantization == "int8"  # its own dtype, named
    model = gptlab.load(out)
    with pytest.raises(GptlabError, match="cannot be trained"):
        model.train()
    from gptlab.formats.peft import apply_lora, load_adapter

    for attach in (lambda: apply_lora(model, "all-linear"), lambda: load_adapter(model, tmp_path, name="a")):
        with pytest.raises(GptlabError, match="LoRA adapters attach to full-precision layers"):
            attach()


def _damage(out, how: str) -> None:
    weights, cfg_file = out / "model.safetensors", out / "config.json"
    cfg = json.loads(cfg_file.read_text())
    tensors = load_file(weights)
    name = "transformer.h.0.attn.c_attn"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "a missing tensor":
        del tensors[f"{name}.scales"]
        save_file(tensors, weights)
    elif how == "integers as floats":
        tensors[f"{name}.qweight"] = tensors[f"{name}.qweight"].float()
        save_file(tensors, weights)
    elif how == "nan scales":
        tensors[f"{name}.scales"][0] = float("nan")
        save_file(tensors, weights)
    elif how == "no quantization_config":
        cfg["model_type"] = cfg.pop("quantization_config")["model_type"]
    elif how == "3 bits":
        cfg["quantization_config"]["bits"] = 3
    elif how == "an unknown layer":
        cfg["quantization_config"]["modules"]["blocks.7.attn.qkv"] = "int8"
    elif how == "pickled weights":
        weights.unlink()
        (out / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    cfg_file.write_text(json.dumps(cfg))


DAMAGE = {
    "truncated": "truncated or not a safetensors file",
    "a missing tensor": "lacks weight 'transformer.h.0.attn.c_attn.scales'",
    "integers as floats": "is torch.float32, not the torch.int8 its quantization_config implies",
    "nan scales": "NaN or infinite values",
    "no quantization_config": "has no quantization_config saying how to read them",
    "3 bits": "bits=3, group_size=None is neither int8",
    "an unknown layer": "names 'blocks.7.attn.qkv', which is not a linear layer",
    "pickled weights": "holds only pickled weights",
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_dir_gets_one_clear_error(how, tiny_gpt2_dir, tmp_path, capsys):
    out = tmp_path / "int8"
    _export(tiny_gpt2_dir, "int8", out)
    _damage(out, how)
    capsys.readouterr()
    assert cli.main(["generate", str(out), "--prompt", "x", "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err and DAMAGE[how] in err, err
