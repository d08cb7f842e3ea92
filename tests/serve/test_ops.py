"""Running the server: /health while loading, /metrics, /tokenize and /detokenize, a client that goes away
mid-stream, SIGTERM with a request in flight, and `gptlab serve` itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

import gptlab
from gptlab.serve.app import ServeConfig, create_app
from tests.serve.conftest import free_port, running

pytestmark = pytest.mark.usefixtures("one_thread")


def _wait_idle(url: str, timeout: float = 20) -> dict:
    """/metrics parsed, once no request is running or waiting."""
    deadline = time.time() + timeout
    while True:
        m = _metrics(url)
        if (m["gptlab_num_requests_running"] == 0 and m["gptlab_num_requests_waiting"] == 0) or time.time() > deadline:
            return m
        time.sleep(0.05)


def _metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_health_is_503_while_loading_then_200(tiny_gpt2_dir, monkeypatch):
    from gptlab.formats import hf

    real = hf.load
    monkeypatch.setattr(hf, "load", lambda *a, **k: (time.sleep(1.5), real(*a, **k))[1])
    with running(create_app(ServeConfig(model=str(tiny_gpt2_dir)))) as url:
        r = httpx.get(f"{url}/health")
        assert r.status_code == 503 and r.json()["error"]["message"] == "the model is loading"
        assert httpx.post(f"{url}/v1/completions", json={"model": str(tiny_gpt2_dir), "prompt": "x"}).status_code == 503
        deadline = time.time() + 30
        while httpx.get(f"{url}/health").status_code != 200 and time.time() < deadline:
            time.sleep(0.1)
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}


@pytest.fixture(scope="module")
def url(tiny_gpt2_dir):
    model, tok = gptlab.load(tiny_gpt2_dir), gptlab.load_tokenizer(tiny_gpt2_dir)
    with running(create_app(ServeConfig(model="m", max_batch=4), model, tok)) as u:
        yield u


@pytest.fixture
def slow(monkeypatch):
    """Engine steps of at least 20 ms: a 120-token request lasts seconds, long enough to walk away from."""
    from gptlab.infer.engine import Engine

    step = Engine.step
    monkeypatch.setattr(Engine, "step", lambda self: (time.sleep(0.02), step(self))[1])


def test_metrics_in_prometheus_format_count_the_work(url):
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    before = _metrics(url)
    prompt = "The with statement " * 12  # two requests share these first blocks
    for _ in range(2):
        c.completions.create(model="m", prompt=prompt, max_tokens=5, temperature=0)
    text = httpx.get(f"{url}/metrics").text
    assert "# TYPE gptlab_time_to_first_token_seconds histogram" in text
    assert "# TYPE gptlab_inter_token_latency_seconds histogram" in text
    m = _wait_idle(url)
    assert m["gptlab_generation_tokens_total"] - before["gptlab_generation_tokens_total"] == 10
    assert m["gptlab_prefix_cache_hits_total"] > before["gptlab_prefix_cache_hits_total"]
    assert m["gptlab_time_to_first_token_seconds_count"] >= 2 and m["gptlab_kv_cache_usage_perc"] == 0
    assert m['gptlab_request_success_total{finished_reason="length"}'] >= 2


def test_tokenize_and_detokenize(url, tiny_gpt2_dir):
    tok = gptlab.load_tokenizer(tiny_gpt2_dir)
    r = httpx.post(f"{url}/tokenize", json={"model": "m", "prompt": "中文 and text"}).json()
    assert r["tokens"] == tok.encode("中文 and text") and r["count"] == len(r["tokens"]) and r["max_model_len"] == 128
    back = httpx.post(f"{url}/detokenize", json={"model": "m", "tokens": r["tokens"]}).json()
    assert back == {"prompt": "中文 and text"}
    assert httpx.post(f"{url}/detokenize", json={"model": "m", "tokens": [10**9]}).status_code == 400
    assert httpx.post(f"{url}/tokenize", json={"model": "m"}).status_code == 400


def test_a_client_that_leaves_mid_stream_frees_its_slot_and_blocks(url, slow):
    body = {"model": "m", "prompt": "The with statement", "max_tokens": 120, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)  # a few tokens arrive, then the client hangs up
    m = _wait_idle(url)
    assert m["gptlab_num_requests_running"] == 0 and m["gptlab_kv_cache_usage_perc"] == 0
    assert m['gptlab_request_success_total{finished_reason="abort"}'] >= 1


def test_a_client_that_leaves_a_plain_request_frees_it_too(url, slow):
    before = _metrics(url).get('gptlab_request_success_total{finished_reason="abort"}', 0)
    body = {"model": "m", "prompt": "The with statement", "max_tokens": 120, "temperature": 0, "n": 2}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/v1/completions", json=body, timeout=0.5)
    m = _wait_idle(url)
    assert m["gptlab_num_requests_running"] == 0 and m["gptlab_kv_cache_usage_perc"] == 0
    assert m['gptlab_request_success_total{finished_reason="abort"}'] == before + 2  # it did not run to the end


def _serve(model_dir, port: int, *extra: str) -> subprocess.Popen:
    code = "import sys; from gptlab.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, "serve", str(model_dir), "--port", str(port), *extra,
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _up(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(proc.stderr.read() if proc.poll() is not None else "server did not come up")


def test_sigterm_finishes_the_request_in_flight_then_exits(tiny_gpt2_dir):
    port = free_port()
    proc = _serve(tiny_gpt2_dir, port, "--api-key", "k")
    try:
        _up(port, proc)
        body = {"model": str(tiny_gpt2_dir), "prompt": "The with statement", "max_tokens": 60, "temperature": 0,
                "stream": True}
        chunks = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60,
                          headers={"Authorization": "Bearer k"}) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
                    if len(chunks) == 2:
                        proc.send_signal(signal.SIGTERM)  # mid-stream
                if line == "data: [DONE]":
                    chunks.append("done")
        assert chunks[-1] == "done" and chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def test_serve_refuses_a_bad_model_in_one_line(tmp_path):
    proc = _serve(tmp_path / "missing", free_port())
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and err.strip().startswith("error:") and "Traceback" not in err
