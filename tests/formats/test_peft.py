"""LoRA: a module swap whose merge equals W + scale * B A, and whose adapters PEFT loads (and vice versa)."""

from __future__ import annotations

import json

import pytest
import torch

import gptlab
from gptlab.errors import GptlabError
from gptlab.formats.peft import apply_lora, load_adapter, save_adapter
from gptlab.models.lora import LoRALinear, lora_layers, merge_lora, unload_lora, unmerge_lora
from tests.conftest import make_hf_model

IDS = torch.tensor([[5, 17, 3, 42, 8, 99, 1, 23, 64, 7], [11, 2, 90, 33, 4, 56, 78, 9, 10, 12]])


def _ours(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path / "base")
    return gptlab.load(tmp_path / "base").float()


def _randomize(model, seed=1):
    """Non-zero B (PEFT starts B at 0, which would make every comparison trivially pass)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for A, B in zip(layer.lora_A, layer.lora_B):
                A.copy_(torch.randn(A.shape, generator=g) * 0.3)
                B.copy_(torch.randn(B.shape, generator=g) * 0.3)


def test_only_adapter_parameters_require_grad(tmp_path):
    model = apply_lora(_ours(make_hf_model("qwen2"), tmp_path), targets=["q_proj", "v_proj"], r=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * model.config.n_layer  # A and B, q and v, per layer
    # the base weight is the very Parameter the model had, under its old name (hf.save still finds it)
    assert "blocks.0.attn.qkv.weight" in model.state_dict()


def test_hf_targets_are_row_slices_of_our_fused_layers(tmp_path):
    model = apply_lora(_ours(make_hf_model("qwen2"), tmp_path), targets=["q_proj", "v_proj", "up_proj"], r=2)
    c = model.config
    nq, nkv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    assert model.blocks[0].attn.qkv.spans == [(0, nq), (nq + nkv, nq + 2 * nkv)]
    assert model.blocks[0].mlp.fc.spans == [(c.intermediate_size, 2 * c.intermediate_size)]  # rows [gate; up]


def test_unknown_or_overlapping_targets_are_errors(tmp_path):
    model = _ours(make_hf_model("qwen2"), tmp_path)
    with pytest.raises(GptlabError, match="matches no Linear.*q_proj"):
        apply_lora(model, targets=["c_attn"])
    with pytest.raises(GptlabError, match="overlap"):
        apply_lora(model, targets=["qkv", "q_proj"])


@pytest.mark.parametrize("model_type,targets", [("gpt2", ["c_attn", "c_fc"]), ("qwen2", ["q_proj", "gate_proj"])])
def test_merge_equals_unmerged_and_merging_twice_is_a_no_op(tmp_path, model_type, targets):
    model = apply_lora(_ours(make_hf_model(model_type), tmp_path), targets=targets, r=4, alpha=8)
    _randomize(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        unmerged = model(IDS)
        merge_lora(model)
        merged = model(IDS)
        once = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        merge_lora(model)
        twice = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(once[n], twice[n]) for n in once)
    # the merged weight is W + scale * B A on exactly the adapter's rows
    layer = model.blocks[0].mlp.fc
    (start, stop), = layer.spans
    expect = before["blocks.0.mlp.fc.weight"].clone()
    expect[start:stop] += layer.scales[0] * layer.lora_B[0] @ layer.lora_A[0]
    torch.testing.assert_close(layer.weight.detach(), expect, atol=1e-6, rtol=0)
    unmerge_lora(model)
    for n, w in before.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].detach(), w, atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_type,targets,keys", [
    ("gpt2", ["c_attn"], ["transformer.h.0.attn.c_attn"]),
    ("qwen2", ["q_proj", "v_proj"], ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]),
    # one LoRA on our fused qkv is exported exactly as q/k/v LoRAs sharing A
    ("qwen2", ["qkv"], ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                        "model.layers.0.self_attn.v_proj"]),
])
def test_gptlab_adapter_loads_in_peft_with_the_same_logits(tmp_path, model_type, targets, keys):
    peft = pytest.importorskip("peft")
    hf = make_hf_model(model_type)
    model = apply_lora(_ours(hf, tmp_path), targets=targets, r=4, alpha=8)
    _randomize(model)
    save_adapter(model, tmp_path / "adapter", base_model="tiny")
    names = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert names["fan_in_fan_out"] == (model_type == "gpt2")  # GPT-2's Conv1D
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter/adapter_model.safetensors"))
    for k in keys:
        assert f"base_model.model.{k}.lora_A.weight" in saved and f"base_model.model.{k}.lora_B.weight" in saved

    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        expect = peft_model(IDS).logits
        got = model(IDS)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type,targets", [
    ("qwen2", ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]),
    ("gpt2", ["c_attn", "c_proj"]),
    ("gpt_neox", ["query_key_value"]),  # per-head interleaved q/k/v: rows are permuted, not sliced
])
def test_peft_adapter_loads_in_gptlab_with_the_same_logits(tmp_path, model_type, targets):
    peft = pytest.importorskip("peft")
    hf = make_hf_model(model_type)
    model = _ours(hf, tmp_path)
    torch.manual_seed(0)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft-adapter")
    load_adapter(model, tmp_path / "peft-adapter")
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        expect = pm.eval()(IDS).logits
        got = model(IDS)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_and_unload(tmp_path):
    hf = make_hf_model("qwen2")
    model = apply_lora(_ours(hf, tmp_path), targets="all-linear", r=2, alpha=4, rslora=True)
    _randomize(model)
    save_adapter(model, tmp_path / "a")
    other = _ours(hf, tmp_path)
    load_adapter(other, tmp_path / "a")
    with torch.no_grad():
        expect = model(IDS)
        torch.testing.assert_close(other(IDS), expect, atol=1e-5, rtol=1e-5)
        unload_lora(model)  # plain Linears again, adapters folded in
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        torch.testing.assert_close(model(IDS), expect, atol=1e-5, rtol=1e-5)


def test_pickled_adapters_are_refused(tmp_path):
    model = _ours(make_hf_model("gpt2"), tmp_path)
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    (d / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(GptlabError, match="pickled"):
        load_adapter(model, d)
