"""Several PEFT adapters served beside their base by one engine: `model` picks the adapter, /v1/models lists
them, an adapter's greedy text equals the merged adapter model's (transformers + peft merge_and_unload), and
base and adapter requests sent together give the texts they give alone. `gptlab serve --lora` end to end."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch

import gptlab
from gptlab.serve.app import ServeConfig, create_app
from tests.conftest import make_hf_model, save_hf_model
from tests.infer.test_multi_lora import make_adapters
from tests.serve.conftest import free_port, running
from tests.serve.test_ops import _serve, _up

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["The with statement", "Return a list of", "异常 class names"]
N = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("serve-lora")
    save_hf_model(make_hf_model("qwen2", vocab_size=tiny_tokenizer.vocab_size, max_position_embeddings=128,
                                eos_token_id=0, bos_token_id=0), root / "base", tiny_tokenizer)
    return root, make_adapters(root / "base", root)


def merged_text(base, adapter, tok, prompt: str) -> str:
    """Greedy text of transformers + peft merge_and_unload (the base alone when adapter is None), to EOS."""
    import peft
    import transformers as T

    hf = T.AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        hf = peft.PeftModel.from_pretrained(hf, adapter).merge_and_unload()
    ids = tok.encode(prompt)
    out = hf.eval().generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False, pad_token_id=0,
                             eos_token_id=0)[0, len(ids):].tolist()
    return tok.decode(out[:out.index(0)] if 0 in out else out)


@pytest.fixture(scope="module")
def server(setup):
    root, dirs = setup
    model, tok = gptlab.load(root / "base").float(), gptlab.load_tokenizer(root / "base")
    cfg = ServeConfig(model="base", max_batch=16, lora={name: str(d) for name, d in dirs.items()})
    with running(create_app(cfg, model, tok)) as url:
        yield url, tok


def test_models_lists_the_base_and_its_adapters(server):
    url, _ = server
    data = httpx.get(f"{url}/v1/models").json()["data"]
    assert [(m["id"], m["parent"]) for m in data] == [("base", None), ("sql", "base"), ("poems", "base")]
    r = httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and "`base`, `sql`, `poems`" in r.json()["error"]["message"]


def test_adapter_text_equals_the_merged_peft_model_and_mixing_changes_nothing(setup, server):
    (root, dirs), (url, tok) = setup, server
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    names = ["base", *dirs]

    async def one(name: str, prompt: str) -> str:
        r = await client.completions.create(model=name, prompt=prompt, max_tokens=N, temperature=0)
        return r.choices[0].text

    async def both() -> tuple[dict, dict]:
        alone = {(n, p): await one(n, p) for n in names for p in PROMPTS}
        keys = [(n, p) for p in PROMPTS for n in names]  # nine requests at once: one batch, three adapters
        return alone, dict(zip(keys, await asyncio.gather(*(one(n, p) for n, p in keys))))

    solo, mixed = asyncio.run(both())
    for name in names:
        for p in PROMPTS:
            assert solo[name, p] == merged_text(root / "base", dirs.get(name), tok, p), (name, p)
    assert len({solo[n, PROMPTS[0]] for n in names}) == 3  # the adapters change the text
    assert mixed == solo


def test_serve_cli_takes_lora_and_refuses_bad_specs(setup, tmp_path):
    root, dirs = setup
    port = free_port()
    proc = _serve(root / "base", port, "--lora", f"sql={dirs['sql']}", "--lora", f"poems={dirs['poems']}",
                  "--served-model-name", "qwen")
    try:
        _up(port, proc)
        ids = [m["id"] for m in httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]]
        assert ids == ["qwen", "sql", "poems"]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": "poems", "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["model"] == "poems"
    finally:
        proc.kill()
    for spec, says in [("sql", "NAME=DIR"), (f"qwen={dirs['sql']}", "taken"), (f"x={tmp_path}", "adapter_config.json")]:
        proc = _serve(root / "base", free_port(), "--lora", spec, "--served-model-name", "qwen")
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0 and says in err and "Traceback" not in err, err
