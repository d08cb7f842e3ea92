"""Every bad request gets OpenAI's error body with the status the official client turns into its own
exception class; nothing a client sends gets a 500."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

import gptlab
from gptlab.serve.app import ServeConfig, create_app
from tests.serve.conftest import running

pytestmark = pytest.mark.usefixtures("one_thread")
MSG = [{"role": "user", "content": "What is a tuple?"}]


@pytest.fixture(scope="module")
def url(reasoner):
    model, tok = gptlab.load(reasoner), gptlab.load_tokenizer(reasoner)
    with running(create_app(ServeConfig(model="m", max_n=4, max_body_bytes=20_000), model, tok)) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def _error(exc) -> dict:
    body = exc.value.body
    assert set(body) >= {"message", "type", "param", "code"} and "Traceback" not in body["message"]
    return body


@pytest.mark.parametrize("field,value", [
    ("max_tokens", -1), ("max_tokens", 0), ("max_tokens", 1.5), ("temperature", -1), ("temperature", 3),
    ("temperature", "hot"), ("top_p", 2), ("top_p", 0), ("n", 0), ("n", 5), ("presence_penalty", 3),
    ("frequency_penalty", -9), ("top_k", -5), ("min_p", 2), ("seed", "x"), ("stop", ["s"] * 40),
    ("max_tokens", 10_000),
])
def test_bad_sampling_parameters_are_400(client, field, value):
    kw = {"extra_body": {field: value}} if field in ("top_k", "min_p") else {field: value}  # vLLM's extra fields
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt="hi", **kw)
    body = _error(e)
    assert body["type"] == "invalid_request_error" and (body["param"] == field or field in body["message"])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=MSG, **kw)


def test_prompts_that_do_not_fit_the_context_are_400(client):
    long = "tuple list dict " * 200  # far past the 256-token context
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt=long, max_tokens=4)
    assert "maximum context length" in _error(e)["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": long}], max_tokens=4)
    with pytest.raises(openai.BadRequestError) as e:  # fits alone, but not with the completion asked for
        client.completions.create(model="m", prompt="tuple " * 20, max_tokens=250)
    assert "maximum context length" in _error(e)["message"] and _error(e)["param"] == "max_tokens"


@pytest.mark.parametrize("body,needle", [
    ({"model": "m"}, "prompt"), ({"model": "m", "prompt": []}, "prompt"), ({"prompt": "x"}, "model"),
    ({"model": "m", "prompt": [[1, 2], [99999]]}, "token ids"), ({"model": "m", "prompt": {"a": 1}}, "prompt"),
])
def test_malformed_completion_bodies_are_400(url, body, needle):
    r = httpx.post(f"{url}/v1/completions", json=body)
    assert r.status_code == 400 and needle in r.json()["error"]["message"] + str(r.json()["error"]["param"])


def test_malformed_json_and_wrong_shapes_are_400(url):
    for data in (b"{not json", b"[1, 2]", b'"text"', b"", b"\xff\xfe"):
        r = httpx.post(f"{url}/v1/chat/completions", content=data, headers={"content-type": "application/json"})
        assert r.status_code == 400, (data, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
    for messages in ("hi", [], [{"role": "wizard", "content": "x"}], [{"content": "x"}]):
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "m", "messages": messages})
        assert r.status_code == 400, messages


def test_unsupported_features_say_so(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=MSG, top_logprobs=2)
    assert "logprobs" in _error(e)["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=MSG, extra_body={"thinking_token_budget": -1})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=MSG,
                                       extra_body={"chat_template_kwargs": {"add_generation_prompt": False}})


def test_unknown_model_route_and_method(client, url):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    assert _error(e)["code"] == "model_not_found"
    r = httpx.get(f"{url}/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(f"{url}/v1/completions").status_code == 405


def test_a_body_over_the_limit_is_413(client):
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="m", prompt="x" * 30_000, max_tokens=2)
    assert e.value.status_code == 413


def test_a_chat_request_to_a_model_without_a_template(tiny_gpt2_dir):
    model, tok = gptlab.load(tiny_gpt2_dir), gptlab.load_tokenizer(tiny_gpt2_dir)
    with running(create_app(ServeConfig(model="plain"), model, tok)) as u:
        c = openai.OpenAI(base_url=f"{u}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="plain", messages=MSG)
        assert "chat template" in e.value.body["message"]


def test_a_full_queue_is_503_and_the_server_recovers(tiny_gpt2_dir):
    model, tok = gptlab.load(tiny_gpt2_dir), gptlab.load_tokenizer(tiny_gpt2_dir)
    with running(create_app(ServeConfig(model="q", max_batch=1, max_waiting=1), model, tok)) as u:
        async def fire():
            async with httpx.AsyncClient(timeout=120) as http:
                body = {"model": "q", "prompt": "The with statement", "max_tokens": 100, "temperature": 0}
                return await asyncio.gather(*[http.post(f"{u}/v1/completions", json=body) for _ in range(4)])

        codes = sorted(r.status_code for r in asyncio.run(fire()))
        assert 200 in codes and 503 in codes and set(codes) <= {200, 503}
        c = openai.OpenAI(base_url=f"{u}/v1", api_key="none", max_retries=0)
        assert c.completions.create(model="q", prompt="x", max_tokens=2).choices[0].finish_reason
