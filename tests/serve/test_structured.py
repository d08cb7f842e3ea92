"""Structured replies and tool calls over the API with the official openai client, on a random-weight model, so
the constraint and not the model is what holds: json_schema replies validate at temperature 1, json_object
replies parse, regex and choice replies match, tool_choice="required" calls validate against their schema, a
tool result goes back through the template, and bad schemas are 400s with OpenAI's error body."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from tokenizers import AddedToken

import gptlab
from gptlab.serve.app import ServeConfig, create_app
from tests.conftest import make_hf_model, save_hf_model
from tests.serve.conftest import running

pytestmark = pytest.mark.usefixtures("one_thread")

# Qwen2.5's layout of tools, in our own words: signatures in the system turn, calls as <tool_call> blocks, tool
# results back as a user turn of <tool_response> blocks
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "# Tools\n\nFunctions you may call, one signature per line:\n<tools>\n"
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools>\n\n"
    "To call one, answer with its name and arguments as JSON in a block:\n"
    "<tool_call>\n{\"name\": <name>, \"arguments\": <arguments>}\n</tool_call><|im_end|>\n"
    "{% elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' and loop.first %}"
    "{% elif m['role'] == 'assistant' and m['tool_calls'] is defined %}<|im_start|>assistant\n{{ m['content'] }}"
    "{% for c in m['tool_calls'] %}<tool_call>\n{\"name\": \"{{ c['function']['name'] }}\", "
    "\"arguments\": {{ c['function']['arguments'] | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "langs": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "城市": {"type": "string", "maxLength": 6},
    },
    "required": ["name", "age", "role", "城市"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 10},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}},
                                       "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris? 巴黎天气如何?"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory, corpus_text):
    from gptlab.tokenizer import train_tokenizer

    tok = train_tokenizer([corpus_text[:60_000]], vocab_size=600, show_progress=False,
                          special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.backend.add_tokens([AddedToken("<tool_call>", special=False), AddedToken("</tool_call>", special=False)])
    tok.chat_template, tok.eos_token = TOOLS_TEMPLATE, "<|im_end|>"
    path = tmp_path_factory.mktemp("structured-serve")
    save_hf_model(make_hf_model("qwen3", vocab_size=tok.vocab_size, max_position_embeddings=1024, hidden_size=64,
                                intermediate_size=128, eos_token_id=tok.token_id("<|im_end|>"), bos_token_id=None),
                  path, tok)
    model, tok = gptlab.load(path).float(), gptlab.load_tokenizer(path)
    with running(create_app(ServeConfig(model="m", max_batch=8), model, tok)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def test_json_schema_replies_validate_at_temperature_one(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = client.chat.completions.create(model="m", messages=ASK, temperature=1.0, n=6, seed=1, max_tokens=200,
                                       response_format=fmt)
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), PERSON)
    r = client.completions.create(model="m", prompt="A person:", temperature=1.0, n=4, seed=2, max_tokens=200,
                                  extra_body={"response_format": fmt})
    for c in r.choices:
        jsonschema.validate(json.loads(c.text), PERSON)


def test_json_object_regex_and_choice(client):
    # free-form JSON: a random model's strings run long, so some replies hit max_tokens; every finished one parses
    r = client.chat.completions.create(model="m", messages=ASK, temperature=1.0, n=6, seed=3, max_tokens=300,
                                       response_format={"type": "json_object"})
    done = [c.message.content for c in r.choices if c.finish_reason == "stop"]
    assert len(done) >= 3, [c.message.content[:60] for c in r.choices]
    assert all(isinstance(json.loads(t), dict) for t in done)
    pattern = r"[A-Z][a-z]{2,6}-[0-9]{3}"  # \\d would be any Unicode digit, as in Rust's regex
    r = client.completions.create(model="m", prompt="Code:", temperature=1.0, n=4, seed=4, max_tokens=30,
                                  extra_body={"structured_outputs": {"regex": pattern}})
    assert all(re.fullmatch(pattern, c.text) for c in r.choices), [c.text for c in r.choices]
    options = ["positive", "negative", "中性"]
    r = client.chat.completions.create(model="m", messages=ASK, temperature=1.0, n=6, seed=5, max_tokens=10,
                                       extra_body={"structured_outputs": {"choice": options}})
    assert all(c.message.content in options for c in r.choices)
    # the older vLLM spelling, and a stream: the pieces add up to a match
    pieces = [ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model="m", messages=ASK, temperature=1.0, seed=6, max_tokens=30, stream=True,
        extra_body={"guided_regex": pattern}) if ch.choices]
    assert re.fullmatch(pattern, "".join(pieces))


def test_required_tool_call_validates_and_its_result_is_answered(client):
    params = WEATHER["function"]["parameters"]
    r = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                       temperature=1.0, n=4, seed=7, max_tokens=120)
    for c in r.choices:
        assert c.finish_reason == "tool_calls", c.message.content
        (call,) = c.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        schema = params if call.function.name == "get_weather" else TIME["function"]["parameters"]
        jsonschema.validate(args, schema)
    # a named function: that one, always
    r = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER, TIME], temperature=1.0, seed=8,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}},
                                       max_tokens=80)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), TIME["function"]["parameters"])
    # the round trip: the call and its result go back through the template, and the model answers
    weather = r.choices[0].message
    turns = ASK + [{"role": "assistant", "content": None, "tool_calls": [tc.model_dump() for tc in weather.tool_calls]},
                   {"role": "tool", "tool_call_id": weather.tool_calls[0].id, "content": "18°C, 多云"}]
    answer = client.chat.completions.create(model="m", messages=turns, tools=[WEATHER, TIME], temperature=0,
                                            max_tokens=8)
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.choices[0].message.content is not None
    prompt = httpx.post(str(client.base_url).replace("/v1/", "/tokenize"), json={"messages": turns, "tools": [WEATHER, TIME]}).json()
    text = gptlab_decode(client, prompt["tokens"])
    assert "<tool_response>\n18°C, 多云\n</tool_response>" in text and '"name": "get_time"' in text
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text


def gptlab_decode(client, tokens):
    return httpx.post(str(client.base_url).replace("/v1/", "/detokenize"), json={"tokens": tokens}).json()["prompt"]


def test_auto_tool_calls_are_parsed_whole_and_streamed(client):
    """tool_choice auto leaves the call to the model; a grammar stands in for a model that calls a tool."""
    block = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    grammar = f'start: "Let me check. " {json.dumps(block)}'
    body = dict(model="m", messages=ASK, tools=[WEATHER], temperature=1.0, max_tokens=200,
                extra_body={"structured_outputs": {"grammar": grammar}})
    r = client.chat.completions.create(**body)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "Let me check."
    assert c.message.tool_calls[0].function.name == "get_weather"
    assert json.loads(c.message.tool_calls[0].function.arguments) == {"city": "Paris", "unit": "celsius"}
    content, calls, finish = "", [], None
    for ch in client.chat.completions.create(**body, stream=True):
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        content += d.content or ""
        calls += d.tool_calls or []
        finish = ch.choices[0].finish_reason or finish
    assert content.strip() == "Let me check." and finish == "tool_calls"
    assert [(t.index, t.function.name) for t in calls] == [(0, "get_weather")]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "unit": "celsius"}
    # tool_choice none: the tools stay out of the prompt and the block is plain content
    r = client.chat.completions.create(**{**body, "tool_choice": "none"})
    assert r.choices[0].message.tool_calls is None and "<tool_call>" in r.choices[0].message.content


@pytest.mark.parametrize("body, says", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                                          "frobnicate": 1}}}},
     "unknown JSON Schema keyword 'frobnicate'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, "cannot be compiled"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema.schema"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "cannot be compiled"),
    ({"structured_outputs": {"choice": []}}, "non-empty list"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "one output constraint"),
    ({"structured_outputs": {"grammar": "start: nothing_defined"}}, "cannot be compiled"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "bogus": 1}}}]},
     "tool f: unknown JSON Schema keyword"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "constrains the reply already"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "get_weather", "arguments": "{not json"}}]}]}, "not JSON"),
])
def test_bad_constraints_are_400s_with_the_error_body(client, body, says):
    known = {k: body.pop(k) for k in ("messages", "tools", "tool_choice", "response_format") if k in body}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{"model": "m", "messages": ASK, "max_tokens": 5, **known}, extra_body=body)
    err = e.value.body
    assert e.value.status_code == 400 and says in err["message"], err
    assert err["type"] == "invalid_request_error"


def test_logprobs_of_a_constrained_reply_are_the_models(client):
    """The mask picks the token; the reported log-probs stay the model's own (finite, as JSON needs)."""
    free = client.completions.create(model="m", prompt="Sentiment:", max_tokens=1, temperature=0, logprobs=5)
    held = client.completions.create(model="m", prompt="Sentiment:", max_tokens=3, temperature=0, logprobs=5,
                                     extra_body={"structured_outputs": {"choice": ["zzz", "qqq"]}})
    assert held.choices[0].text in ("zzz", "qqq")
    assert held.choices[0].logprobs.top_logprobs[0] == pytest.approx(free.choices[0].logprobs.top_logprobs[0])
    assert all(-1e4 < lp < 0 for lp in held.choices[0].logprobs.token_logprobs)
