"""Rotary scaling read from config.json both ways, and dynamic NTK against transformers past the original context.

Linear and YaRN scaling run the whole parity suite (tests/formats/test_parity.py). Dynamic NTK is here: its
frequencies depend on the length of the sequence in each forward, so transformers' cached decode (each new
token at the current length, earlier keys as cached) differs from its own full forward; ours equals it in both.
"""

from __future__ import annotations

import json

import pytest
import torch

import gptlab
from gptlab.errors import GptlabError
from gptlab.formats.hfconfig import config_from_hf, config_to_hf
from gptlab.infer.generate import generate_ids
from gptlab.models.kvcache import DenseCache
from tests.conftest import make_hf_model, save_hf_model

DYNAMIC = [
    ("qwen2", dict(max_position_embeddings=16, rope_scaling={"rope_type": "dynamic", "factor": 4.0})),
    ("gpt_neox", dict(max_position_embeddings=16, rotary_pct=0.5, rope_scaling={"type": "dynamic", "factor": 3.0})),
]


@pytest.fixture(scope="module", params=range(len(DYNAMIC)), ids=[f for f, _ in DYNAMIC])
def dynamic(request, tmp_path_factory):
    family, overrides = DYNAMIC[request.param]
    path = save_hf_model(make_hf_model(family, seed=7, **overrides), tmp_path_factory.mktemp(family))
    return path, gptlab.load(path)


def _hf(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()  # fresh: its dynamic state is reset


def _tokens(vocab, n, seed=0):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def test_dynamic_reads_the_extended_context(dynamic):
    _, ours = dynamic
    c = ours.config
    assert (c.rope_scaling, c.rope_original_context, c.context_length) == ("dynamic", 16, int(16 * c.rope_factor))


def test_dynamic_full_forward_matches_transformers_past_the_original_context(dynamic):
    path, ours = dynamic
    x = _tokens(ours.config.vocab_size, 40)
    with torch.no_grad():
        ref, out = _hf(path)(x).logits, ours(x)
    assert (out - ref).abs().max().item() <= 1e-4
    with torch.no_grad():  # and the scaling is in effect: the first 16 tokens alone see other frequencies
        assert (ours(x[:, :16]) - out[:, :16]).abs().max().item() > 1e-5  # fp32 noise is ~1e-7


def test_dynamic_cached_decode_matches_transformers_cached_decode(dynamic):
    from transformers import DynamicCache

    path, ours = dynamic
    hf = _hf(path)
    x = _tokens(ours.config.vocab_size, 40, seed=1)
    with torch.no_grad():
        past = DynamicCache(config=hf.config)
        ref = [hf(x[:, :10], past_key_values=past, use_cache=True).logits]
        ref += [hf(x[:, t:t + 1], past_key_values=past, use_cache=True).logits for t in range(10, 40)]
        cache = DenseCache.for_model(ours, 1, 40)
        got = [ours(x[:, :10], cache=cache)] + [ours(x[:, t:t + 1], cache=cache) for t in range(10, 40)]
    assert (torch.cat(got, 1) - torch.cat(ref, 1)).abs().max().item() <= 1e-4


def test_dynamic_greedy_generation_matches_transformers(dynamic):
    """Through the engine's paged cache, past the original context of 16."""
    path, ours = dynamic
    prompt = _tokens(ours.config.vocab_size, 7, seed=2)
    with torch.no_grad():
        ref = _hf(path).generate(prompt, max_new_tokens=30, min_new_tokens=30, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, 7:].tolist()
    assert generate_ids(ours, [prompt[0].tolist()], max_new_tokens=30, eos_id=[])[0] == ref


def test_dynamic_rows_of_one_batch_use_their_own_lengths(dynamic):
    _, ours = dynamic
    prompts = [_tokens(ours.config.vocab_size, n, seed=n)[0].tolist() for n in (3, 20)]
    batched = generate_ids(ours, prompts, max_new_tokens=12, eos_id=[])
    assert batched == [generate_ids(ours, [p], max_new_tokens=12, eos_id=[])[0] for p in prompts]


def test_dynamic_save_reloads_in_transformers(dynamic, tmp_path):
    path, ours = dynamic
    gptlab.save(ours, tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert written["max_position_embeddings"] == 16
    assert written["rope_scaling"]["rope_type"] == written["rope_parameters"]["rope_type"] == "dynamic"
    x = _tokens(ours.config.vocab_size, 30, seed=3)
    with torch.no_grad():
        assert (_hf(tmp_path / "saved")(x).logits - _hf(path)(x).logits).abs().max().item() <= 1e-5


# ---- reading and writing config.json ----

QWEN = {"model_type": "qwen2", "vocab_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 32,
        "intermediate_size": 48, "max_position_embeddings": 32768, "rope_theta": 1000000.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


def test_rope_scaling_and_rope_parameters_read_the_same():
    old = config_from_hf({**QWEN, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 32768}})
    new = config_from_hf({**QWEN, "rope_parameters": {**YARN, "rope_theta": 1000000.0}})
    assert old == new
    assert (new.context_length, new.rope_original_context, new.rope_theta) == (131072, 32768, 1000000.0)
    assert new.rope_attention_factor == pytest.approx(0.1 * torch.tensor(4.0).log().item() + 1)


def test_yarn_attention_factor_equals_transformers():
    import transformers

    for extra in ({}, {"mscale": 1.0, "mscale_all_dim": 0.5}, {"attention_factor": 0.9}):
        d = {**QWEN, "rope_scaling": {**YARN, **extra}}
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**d))
        assert config_from_hf(d).rope_attention_factor == pytest.approx(hf.model.rotary_emb.attention_scaling)


def test_yarn_factor_defaults_to_the_context_ratio():
    c = config_from_hf({**QWEN, "max_position_embeddings": 65536,
                        "rope_scaling": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 16384}})
    assert (c.rope_factor, c.context_length) == (4.0, 65536)


def test_scaled_config_round_trips():
    c = config_from_hf({**QWEN, "rope_scaling": {**YARN, "beta_fast": 16, "truncate": False}})
    d = config_to_hf(c)
    assert d["rope_scaling"]["beta_fast"] == 16 and d["rope_scaling"]["truncate"] is False
    assert config_from_hf(d) == c.replace(name="qwen2")


@pytest.mark.parametrize("d, message", [
    ({**QWEN, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_scaling rope_type='longrope' is not supported"),
    ({**QWEN, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "rope_parameters rope_type='llama3'"),
    ({**QWEN, "rope_scaling": {"rope_type": "linear"}}, "needs a number factor >= 1 for rope_type='linear'"),
    ({**QWEN, "rope_scaling": {"rope_type": "dynamic", "factor": 0.5}}, "factor >= 1"),
    ({"model_type": "gptj", "vocab_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32, "rotary_dim": 8,
      "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "not supported for gptj"),
])
def test_unsupported_rope_scaling_is_one_clear_error(d, message):
    with pytest.raises(GptlabError, match=message.replace("(", r"\(").replace("[", r"\[")):
        config_from_hf(d)


def test_gpt2_layer_scaling_changes_the_model():
    """The per-layer scale is really applied: the same weights without it give other logits."""
    hf = make_hf_model("gpt2", n_layer=3, scale_attn_by_inverse_layer_idx=True)
    ours = gptlab.models.model.GPT(config_from_hf(hf.config.to_dict()))
    assert ours.config.scale_attn_by_layer and ours.blocks[2].attn.scale == pytest.approx((16 ** -0.5) / 3)


def test_upcast_attention_runs_in_bf16(tmp_path):
    hf = make_hf_model("gpt2", n_layer=2, reorder_and_upcast_attn=True)
    path = save_hf_model(hf, tmp_path / "m")
    x = _tokens(100, 12)
    with torch.no_grad():
        ref = hf(x).logits
        low = gptlab.load(path, dtype="bfloat16")
        out = low(x)
        cached = generate_ids(low, [x[0].tolist()], max_new_tokens=5, eos_id=[])[0]
    assert out.dtype == torch.bfloat16 and len(cached) == 5
    assert (out.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_gpt2_scaled_attention_trains_and_saves_back(tiny_tokenizer, tmp_path, capsys):
    """Fine-tuned in full, then saved: the same config keys, and transformers computes the same logits."""
    import transformers

    from gptlab.cli import main

    hf = make_hf_model("gpt2", vocab_size=tiny_tokenizer.vocab_size, n_positions=64, n_layer=3, bos_token_id=0,
                       eos_token_id=0, scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True)
    base = save_hf_model(hf, tmp_path / "base", tiny_tokenizer)
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of some text to learn"}) + "\n" for i in range(40)))
    assert main(["finetune", str(base), "--data", str(data), "--task", "lm", "--method", "full", "--max-steps", "4",
                 "--out-dir", str(tmp_path / "run"), "--precision", "fp32", "--quiet", "--seq-len", "32"]) == 0
    final = tmp_path / "run" / "final"
    saved = json.loads((final / "config.json").read_text())
    assert saved["scale_attn_by_inverse_layer_idx"] is True and saved["reorder_and_upcast_attn"] is True
    trained = gptlab.load(final)
    x = _tokens(tiny_tokenizer.vocab_size, 20)
    with torch.no_grad():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(final).eval()(x).logits
        assert (trained(x) - theirs).abs().max().item() <= 1e-4
        assert (trained(x) - gptlab.load(base)(x)).abs().max().item() > 1e-4  # it did train
    capsys.readouterr()
