"""Schemathesis generates requests from the server's own /openapi.json (bounded examples per route): no
input may get a 5xx. The server caps max_tokens at 8 so that every accepted request is quick."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

import gptlab
from gptlab.serve.app import ServeConfig, create_app
from tests.serve.conftest import running

KEY = "fuzz-key"
EXAMPLES = 40  # per route


@pytest.fixture(scope="module")
def fuzz_url(reasoner):
    model, tok = gptlab.load(reasoner), gptlab.load_tokenizer(reasoner)
    with running(create_app(ServeConfig(model="m", api_key=KEY, max_tokens=8, max_n=2), model, tok)) as url:
        yield url


def test_no_request_gets_a_server_error(fuzz_url):
    raw = httpx.get(f"{fuzz_url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    schema = schemathesis.openapi.from_dict(raw)
    routes, seen = [], {}
    for result in schema.get_all_operations():
        op = result.ok()
        routes.append(f"{op.method.upper()} {op.path}")

        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def check(case):
            response = case.call(base_url=fuzz_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
            seen.setdefault(f"{op.method.upper()} {op.path}", []).append(response.status_code)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
            if response.status_code >= 400:
                assert set(response.json()["error"]) >= {"message", "type", "param", "code"}

        check()
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize"} <= set(routes)
    for route in ("POST /v1/completions", "POST /v1/chat/completions"):  # accepted requests were generated too
        assert 200 in seen[route] and 400 in seen[route], seen[route]
