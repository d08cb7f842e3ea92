"""`gptlab serve --draft`: the openai client gets what the server gives without a draft (plain and streamed),
seeded samples repeat, and /metrics counts the draft's proposals and the ones kept."""

from __future__ import annotations

import httpx
import openai
import pytest

import gptlab
from tests.serve.conftest import free_port
from tests.serve.test_ops import _metrics, _serve, _up

pytestmark = pytest.mark.usefixtures("one_thread")


def test_serve_with_a_draft_answers_the_openai_client_and_counts_acceptance(tiny_gpt2_dir):
    model, tok = gptlab.load(tiny_gpt2_dir), gptlab.load_tokenizer(tiny_gpt2_dir)
    prompt = "The with statement"
    expected = gptlab.generate(model, tok, prompt, max_new_tokens=24, temperature=0)  # no draft, in this process
    port = free_port()
    # the model as its own draft: every proposal is kept, so the counters have an exact value to meet
    proc = _serve(tiny_gpt2_dir, port, "--draft", str(tiny_gpt2_dir), "--draft-tokens", "3", "--served-model-name", "m")
    try:
        _up(port, proc)
        url = f"http://127.0.0.1:{port}"
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        r = c.completions.create(model="m", prompt=prompt, max_tokens=24, temperature=0)
        assert r.choices[0].text == expected and r.usage.completion_tokens <= 24
        pieces = [ch.choices[0].text for ch in c.completions.create(model="m", prompt=prompt, max_tokens=24,
                                                                      temperature=0, stream=True) if ch.choices]
        assert "".join(pieces) == expected
        sampled = [c.completions.create(model="m", prompt=prompt, max_tokens=16, temperature=0.9, seed=3, n=2)
                   for _ in range(2)]
        assert [ch.text for ch in sampled[0].choices] == [ch.text for ch in sampled[1].choices]
        m = _metrics(url)
        assert m["gptlab_spec_decode_num_draft_tokens_total"] > 0 and m["gptlab_spec_decode_num_drafts_total"] > 0
        assert m["gptlab_spec_decode_num_accepted_tokens_total"] == m["gptlab_spec_decode_num_draft_tokens_total"]
        assert m['gptlab_spec_decode_num_accepted_tokens_per_pos_total{position="0"}'] == \
            m["gptlab_spec_decode_num_drafts_total"]
        assert "# TYPE gptlab_spec_decode_num_accepted_tokens_total counter" in httpx.get(f"{url}/metrics").text
    finally:
        proc.kill()
        proc.wait(timeout=30)
