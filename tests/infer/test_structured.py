"""Constrained decoding in the engine, on a random-weight model so that the constraint, not the model, is
what holds: JSON schemas validate, objects parse, regexes and choices match, at temperature 1; constrained
and free rows share a batch without changing the free rows' output; bad constraints are clear errors."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

import gptlab
from gptlab.errors import GptlabError
from gptlab.infer.engine import Engine, EngineConfig
from gptlab.infer.generate import generate
from gptlab.infer.sampling import Sampling
from gptlab.infer.structured import Constraint, check_schema
from tests.conftest import make_hf_model

pytestmark = pytest.mark.usefixtures("one_thread")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$"},
        "tags": {"type": "array", "items": {"enum": ["admin", "user", "guest"]}, "maxItems": 3},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "nick": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 5}]},
    },
    "required": ["name", "age", "email", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def lm(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("structured")
    make_hf_model("qwen3", vocab_size=tiny_tokenizer.vocab_size, max_position_embeddings=512, eos_token_id=0,
                  bos_token_id=0).save_pretrained(path)
    tiny_tokenizer.save(path)
    return gptlab.load(path).float(), gptlab.load_tokenizer(path)


def run(lm, prompts, samplings):
    model, tok = lm
    return Engine(model, tok, EngineConfig(max_batch=16)).generate(prompts, samplings)


def test_json_schema_replies_validate_at_temperature_one(lm):
    c = Constraint.json_schema(PERSON)
    outs = run(lm, ["A user record:"] * 12, [Sampling(max_new_tokens=250, temperature=1.0, seed=i, constraint=c)
                                             for i in range(12)])
    for o in outs:
        out = o.outputs[0]
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), PERSON)


def test_json_object_regex_choice_and_lark(lm):
    kinds = [
        (Constraint.json_object(), lambda t: isinstance(json.loads(t), dict)),
        (Constraint.regex(r"[0-9]{3}-[A-Z]{2}-(x|y)"), lambda t: re.fullmatch(r"[0-9]{3}-[A-Z]{2}-(x|y)", t)),
        (Constraint.choice(["positive", "negative", "neutral", "中性"]),
         lambda t: t in ("positive", "negative", "neutral", "中性")),
        (Constraint.lark('start: "SELECT " COL " FROM t"\nCOL: /[a-z]{1,6}/'),
         lambda t: re.fullmatch(r"SELECT [a-z]{1,6} FROM t", t)),
    ]
    for c, ok in kinds:
        outs = run(lm, ["Answer:"] * 6, [Sampling(max_new_tokens=300, temperature=1.0, seed=i, constraint=c)
                                         for i in range(6)])
        finished = [o.outputs[0] for o in outs if o.outputs[0].finish_reason == "stop"]
        assert len(finished) >= 4, (c.kind, [o.outputs[0].text[:80] for o in outs])
        for out in finished:
            assert ok(out.text), (c.kind, out.text)
    # a choice ends the moment it is complete: no extra token is generated
    out = run(lm, ["x"], [Sampling(max_new_tokens=50, constraint=Constraint.choice(["yes", "no"]))])[0].outputs[0]
    assert out.text in ("yes", "no") and out.finish_reason == "stop" and out.num_tokens == len(out.token_ids)


def test_free_rows_are_unchanged_by_constrained_neighbours(lm):
    free = Sampling(max_new_tokens=20, temperature=0.8, seed=3)
    alone = run(lm, ["The with statement"], [free])[0].outputs[0].text
    c = Sampling(max_new_tokens=40, temperature=1.0, seed=1, constraint=Constraint.json_schema(PERSON))
    mixed = run(lm, ["Record:", "The with statement", "Record:"], [c, free, c])
    assert mixed[1].outputs[0].text == alone
    assert mixed[0].outputs[0].text.startswith('{"name":"')


def test_generate_api_takes_a_constraint(lm):
    model, tok = lm
    text = generate(model, tok, "Colour:", max_new_tokens=10, constraint=Constraint.choice(["red", "green"]))
    assert text in ("red", "green")
    text = generate(model, tok, "Person:", max_new_tokens=200, temperature=1.0, seed=0, json_schema=PERSON)
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("schema,match", [
    ({"type": "object", "properties": {"a": {"type": "string", "maxLenght": 3}}}, "unknown JSON Schema keyword 'maxLenght' at /properties/a/maxLenght"),
    ({"type": "objekt"}, "cannot be compiled"),
    ({"type": "array", "uniqueItems": True}, "cannot be compiled: Unimplemented keys.*uniqueItems"),
    ({"type": "string", "format": "no-such-format"}, "cannot be compiled"),
    ({"properties": []}, "must be an object of schemas"),
    ([1, 2], "must be an object or a boolean"),
])
def test_bad_schemas_are_clear_errors(lm, schema, match):
    model, tok = lm
    with pytest.raises(GptlabError, match=match):
        c = Constraint.json_schema(schema)
        Engine(model, tok).add_request("x", Sampling(constraint=c))


def test_bad_regex_grammar_and_choice_are_clear_errors(lm):
    model, tok = lm
    e = Engine(model, tok)
    for c in [Constraint.regex("(unclosed"), Constraint.lark("start: undefined_rule")]:
        with pytest.raises(GptlabError, match=f"the {c.kind} constraint cannot be compiled"):
            e.add_request("x", Sampling(constraint=c))
    with pytest.raises(GptlabError, match="non-empty list"):
        Constraint.choice([])
    with pytest.raises(GptlabError, match="not valid JSON"):
        Constraint.json_schema("{nope")
    assert not e.has_unfinished()


def test_schema_check_allows_the_standard_and_extensions():
    check_schema({"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "T", "type": "object",
                  "$defs": {"maxLenght": {"type": "string"}}, "properties": {"type": {"$ref": "#/$defs/maxLenght"}},
                  "x-guidance": {"whitespace_flexible": False}, "dependencies": {"a": ["b"]}})
