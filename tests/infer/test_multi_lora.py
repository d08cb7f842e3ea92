"""Several LoRA adapters on one base in one engine: a request's greedy output through its adapter equals the
merged adapter model's (transformers + peft merge_and_unload) alone, and mixing base and adapter requests in
one batch changes no one's output."""

from __future__ import annotations

import pytest
import torch

import gptlab
from gptlab.errors import GptlabError
from gptlab.formats.peft import load_adapter
from gptlab.infer.engine import Engine, EngineConfig
from gptlab.infer.sampling import Sampling
from gptlab.models.lora import adapter_names, merge_lora
from tests.conftest import make_hf_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[5, 17, 3, 42, 8, 99, 1, 23], [11, 2, 90, 33, 4, 56, 78, 9, 10, 12, 3, 3, 7, 1, 60, 61, 62, 9]]
ADAPTERS = {"sql": (["q_proj", "v_proj"], 4, 8.0), "poems": (["gate_proj", "up_proj", "o_proj", "k_proj"], 8, 4.0)}


def make_adapters(base_dir, root, model_type="qwen2"):
    """PEFT adapters with random (non-zero) B, saved by peft itself; returns {name: dir}."""
    import peft
    import transformers as T

    dirs = {}
    for i, (name, (targets, r, alpha)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(10 + i)
        hf = T.AutoModelForCausalLM.from_pretrained(base_dir)
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        pm = peft.get_peft_model(hf, cfg)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(3.0)  # a visible change of the greedy text
        pm.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


def merged_greedy(base_dir, adapter_dir, prompt, n):
    import peft
    import transformers as T

    hf = T.AutoModelForCausalLM.from_pretrained(base_dir)
    merged = peft.PeftModel.from_pretrained(hf, adapter_dir).merge_and_unload().eval() if adapter_dir else hf.eval()
    out = merged.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi-lora")
    make_hf_model("qwen2", vocab_size=100, max_position_embeddings=128).save_pretrained(root / "base")
    dirs = make_adapters(root / "base", root)
    model = gptlab.load(root / "base").float()
    for name, d in dirs.items():
        load_adapter(model, d, name=name)
    return root, dirs, model


N = 12


def _engine(model):
    return Engine(model, None, EngineConfig(max_batch=16, num_blocks=128, block_size=4))


def test_adapter_output_equals_the_merged_peft_model(setup):
    root, dirs, model = setup
    assert adapter_names(model) == ["sql", "poems"]
    s = Sampling(max_new_tokens=N, eos_id=[])
    for name in [None, *dirs]:
        for prompt in PROMPTS:
            rid = (e := _engine(model)).add_request(prompt, s, adapter=name)
            while e.has_unfinished():
                e.step()
            ours = e.output(rid).outputs[0].token_ids
            assert ours == merged_greedy(root / "base", dirs.get(name), prompt, N), name
    base = merged_greedy(root / "base", None, PROMPTS[0], N)
    assert all(merged_greedy(root / "base", d, PROMPTS[0], N) != base for d in dirs.values())  # they do differ


def test_mixed_batches_give_each_request_what_it_gets_alone(setup):
    _, dirs, model = setup
    s = Sampling(max_new_tokens=N, eos_id=[])
    jobs = [(p, a) for p in PROMPTS for a in [None, *dirs]] * 2
    alone = []
    for p, a in jobs:
        e = _engine(model)
        rid = e.add_request(p, s, adapter=a)
        while e.has_unfinished():
            e.step()
        alone.append(e.output(rid).outputs[0].token_ids)
    e = _engine(model)
    rids = [e.add_request(p, s, adapter=a) for p, a in jobs]
    steps = 0
    while e.has_unfinished():
        e.step()
        steps += 1
    assert [e.output(r).outputs[0].token_ids for r in rids] == alone
    assert steps == N  # one batch: all prompts prefilled in the first step (its token is the first of N)


def test_prefix_cache_never_shares_blocks_between_adapters(setup):
    _, _, model = setup
    e = _engine(model)
    s = Sampling(max_new_tokens=2, eos_id=[])
    prompt = list(range(1, 30))
    e.generate([prompt], s)  # the base model's blocks of this prompt are now cached
    for a in ["sql", "poems"]:
        rid = e.add_request(prompt, s, adapter=a)
        while e.has_unfinished():
            e.step()
        assert e.output(rid).num_cached_tokens == 0, a
    rid = e.add_request(prompt, s, adapter="sql")  # the same adapter again: its own blocks are reused
    while e.has_unfinished():
        e.step()
    assert e.output(rid).num_cached_tokens > 0


def test_unknown_adapter_and_merging_named_adapters_are_errors(setup, tmp_path):
    _, dirs, model = setup
    with pytest.raises(GptlabError, match="no LoRA adapter named 'nope'.*sql, poems"):
        _engine(model).add_request([1, 2, 3], Sampling(max_new_tokens=2), adapter="nope")
    with pytest.raises(GptlabError, match="cannot be merged"):
        merge_lora(model)
    with pytest.raises(GptlabError, match="already loaded"):
        load_adapter(model, dirs["sql"], name="sql")
