"""Servers on loopback for the serving tests, and `reasoner`: a tiny Qwen3-shaped model trained here (a few
seconds) to answer in Qwen3's format, so reasoning tests see a model open <think> by itself."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

# Qwen3's chat template, cut to what the tests need: ChatML turns; enable_thinking=false writes an empty
# reasoning block for the model, as Qwen3's own template does
QWEN3_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)
# Qwen3-Thinking-2507 / DeepSeek-R1 style: the template opens the reasoning block itself
THINKING_TEMPLATE = QWEN3_TEMPLATE.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'")

WORDS = ("tuple list dict set class function module import return yield value object method string "
         "number loop file name scope error type").split()


def _conversation(rnd: random.Random) -> tuple[str, str, str]:
    q = "What is a " + rnd.choice(WORDS) + "?"
    thought = "Okay, " + " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(6, 14)))
    answer = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(2, 5)))
    return q, thought, answer


@pytest.fixture(scope="session")
def reasoner(tmp_path_factory, corpus_text) -> Path:
    import gptlab
    from gptlab.tokenizer import train_tokenizer
    from tests.conftest import make_hf_model, save_hf_model

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tok = train_tokenizer([corpus_text[:80_000]] + [" ".join(WORDS)] * 50, vocab_size=600, special_tokens=specials,
                          show_progress=False)
    tok.chat_template, tok.eos_token = QWEN3_TEMPLATE, "<|im_end|>"
    end = tok.token_id("<|im_end|>")
    path = tmp_path_factory.mktemp("reasoner")
    save_hf_model(make_hf_model("qwen3", vocab_size=tok.vocab_size, max_position_embeddings=256, hidden_size=64,
                                intermediate_size=128, eos_token_id=end, bos_token_id=None), path)
    model = gptlab.load(path).float().train()
    rnd = random.Random(0)
    rows = []
    for _ in range(400):  # prompt and reply tokenised apart, as a serving engine sees them
        q, thought, answer = _conversation(rnd)
        think = rnd.random() < 0.7
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], enable_thinking=think)
        reply = f"<think>\n{thought}\n</think>\n\n{answer}" if think else answer
        rows.append(tok.encode(prompt) + tok.encode(reply) + [end])
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-3)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(250):
            batch = [rows[(step * 16 + i) % len(rows)] for i in range(16)]
            T = max(map(len, batch))
            x = torch.full((16, T), end)
            y = torch.full((16, T), -100)
            for r, ids in enumerate(batch):
                x[r, :len(ids)] = torch.tensor(ids)
                y[r, :len(ids) - 1] = torch.tensor(ids[1:])
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"reasoner: final training loss {loss.item():.3f}")
    finally:
        torch.set_num_threads(n)
    gptlab.save(model.eval(), path, tokenizer=tok)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """Serve an ASGI app with uvicorn on a free loopback port in this process; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
