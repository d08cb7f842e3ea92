"""`gptlab serve` driven by the official `openai` client over loopback: models, completions and chat, plain
and streamed, n, stop, seed, usage, logprobs, Qwen3 reasoning with and without a budget, and the API key."""

from __future__ import annotations

import openai
import pytest

import gptlab
from gptlab.infer.thinking import EARLY_STOP
from gptlab.serve.app import ServeConfig, create_app
from tests.serve.conftest import THINKING_TEMPLATE, running

KEY = "test-key"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(reasoner):
    model, tok = gptlab.load(reasoner), gptlab.load_tokenizer(reasoner)
    with running(create_app(ServeConfig(model="reasoner", api_key=KEY, max_batch=8), model, tok)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


QUESTION = [{"role": "user", "content": "What is a tuple?"}]
THOUGHT = "<|im_start|>assistant\n<think>\nOkay, tuple"  # the model goes on with reasoning words


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["reasoner"] and models[0].max_model_len == 256


def test_completion_plain_and_streamed_are_the_same_text(client, reasoner):
    kw = dict(model="reasoner", prompt=THOUGHT, max_tokens=12, temperature=0)
    plain = client.completions.create(**kw)
    pieces, usage = [], None
    for chunk in client.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
        usage = chunk.usage or usage
    assert "".join(pieces) == plain.choices[0].text and plain.choices[0].finish_reason in ("length", "stop")
    assert plain.usage.prompt_tokens == len(gptlab.load_tokenizer(reasoner).encode(THOUGHT))
    assert usage.completion_tokens == plain.usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_n_samples_seed_and_echo(client):
    kw = dict(model="reasoner", prompt=THOUGHT, max_tokens=10, temperature=1.0, seed=7, n=3)
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert len(texts) == 3 and texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # the n samples differ; the seed makes the request reproducible
    echoed = client.completions.create(model="reasoner", prompt="A list is", max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("A list is")


def test_stop_strings_end_the_text_and_are_left_out(client):
    free = client.completions.create(model="reasoner", prompt=THOUGHT, max_tokens=20, temperature=0).choices[0].text
    word = free.split()[1]  # a word the model does write
    cut = client.completions.create(model="reasoner", prompt=THOUGHT, max_tokens=20, temperature=0, stop=[word])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == free[:free.index(word)]


def test_logprobs_in_both_shapes(client):
    c = client.completions.create(model="reasoner", prompt=THOUGHT, max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 4 and all(len(t) == 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == c.choices[0].text and all(v <= 0 for v in lp.token_logprobs)
    r = client.chat.completions.create(model="reasoner", messages=QUESTION, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and all(len(e.top_logprobs) == 3 for e in content)
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob


def test_chat_reasoning_comes_apart_from_the_answer(client):
    r = client.chat.completions.create(model="reasoner", messages=QUESTION, max_tokens=60, temperature=0)
    m = r.choices[0].message
    reasoning = m.model_extra.get("reasoning_content")
    assert reasoning and reasoning.strip().startswith("Okay,") and "<think>" not in reasoning
    assert m.content and "</think>" not in m.content and r.choices[0].finish_reason == "stop"
    # streamed: the same reasoning and answer, in reasoning_content / content deltas, the prompt never echoed
    reasoning_parts, answer_parts, roles = [], [], []
    for chunk in client.chat.completions.create(model="reasoner", messages=QUESTION, max_tokens=60, temperature=0,
                                                stream=True):
        d = chunk.choices[0].delta
        roles.append(d.role)
        reasoning_parts.append((d.model_extra or {}).get("reasoning_content") or "")
        answer_parts.append(d.content or "")
    assert "".join(reasoning_parts) == reasoning and "".join(answer_parts) == m.content
    assert roles[0] == "assistant" and "What is a tuple" not in "".join(answer_parts + reasoning_parts)


def test_enable_thinking_false_gives_no_reasoning(client):
    r = client.chat.completions.create(model="reasoner", messages=QUESTION, max_tokens=30, temperature=0,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert not r.choices[0].message.model_extra.get("reasoning_content") and r.choices[0].message.content


def test_thinking_budget_caps_the_reasoning_within_max_tokens(client):
    kw = dict(model="reasoner", messages=QUESTION, temperature=0)
    free = client.chat.completions.create(**kw, max_tokens=80)
    capped = client.chat.completions.create(**kw, max_tokens=80, extra_body={"thinking_token_budget": 3})
    reasoning = capped.choices[0].message.model_extra["reasoning_content"]
    tail = EARLY_STOP.split("</think>")[0]
    assert reasoning.endswith(tail) and len(reasoning) < len(free.choices[0].message.model_extra["reasoning_content"]) + len(tail)
    assert capped.choices[0].message.content  # the answer still comes, after the forced end of reasoning
    assert capped.usage.completion_tokens <= 80
    cut = client.chat.completions.create(**kw, max_tokens=12, extra_body={"thinking_token_budget": 3})
    assert cut.usage.completion_tokens == 12 and cut.choices[0].finish_reason == "length"


def test_a_template_that_opens_the_block_and_a_server_default_budget(reasoner):
    model, tok = gptlab.load(reasoner), gptlab.load_tokenizer(reasoner)
    tok.chat_template = THINKING_TEMPLATE  # Qwen3-Thinking-2507 style: the prompt ends with "<think>\n"
    with running(create_app(ServeConfig(model="r", thinking_budget=2), model, tok)) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        r = c.chat.completions.create(model="r", messages=QUESTION, max_tokens=80, temperature=0)
        m = r.choices[0].message
        assert m.model_extra["reasoning_content"].endswith(EARLY_STOP.split("</think>")[0]) and m.content
        free = c.chat.completions.create(model="r", messages=QUESTION, max_tokens=80, temperature=0,
                                         extra_body={"thinking_token_budget": 1000})
        assert not free.choices[0].message.model_extra["reasoning_content"].endswith(EARLY_STOP.split("</think>")[0])


def test_the_api_key_guards_every_route_but_health(server):
    import httpx

    c = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        c.chat.completions.create(model="reasoner", messages=QUESTION, max_tokens=2)
    assert e.value.body["code"] == "invalid_api_key" and "message" in e.value.body
    for path in ("/metrics", "/v1/models", "/openapi.json"):  # no key at all
        r = httpx.get(server + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.post(server + "/tokenize", json={"prompt": "x"}).status_code == 401
    assert httpx.get(server + "/health").status_code == 200
