"""A bounded load run on loopback: 16 concurrent clients for GPTLAB_LOAD_SECONDS (20 s here; the note's
figures use 60) mixing streamed and plain completions and chats, a quarter of them hanging up mid-stream.
No request may fail, nothing may be left running, and memory must stay flat."""

from __future__ import annotations

import asyncio
import os
import random
import time

import httpx
import pytest

import gptlab
from gptlab.serve.app import ServeConfig, create_app
from tests.serve.conftest import running

pytestmark = pytest.mark.usefixtures("one_thread")
CLIENTS = 16
SECONDS = float(os.environ.get("GPTLAB_LOAD_SECONDS", "20"))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


async def _client(url: str, seed: int, until: float, stats: dict) -> None:
    rnd = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        while time.time() < until:
            kind = rnd.choice(["completion", "stream", "chat", "chat-stream", "cancel"])
            body = {"model": "m", "max_tokens": rnd.randint(4, 40), "temperature": rnd.choice([0, 0.8]),
                    "seed": rnd.randint(0, 99)}
            if kind.startswith("chat") or kind == "cancel":
                path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": f"What is a {rnd.choice(['list', 'set', 'tuple'])}?"}]
            else:
                path, body["prompt"] = "/v1/completions", "Okay, tuple list " * rnd.randint(1, 8)
            try:
                if kind in ("stream", "chat-stream", "cancel"):
                    body["stream"] = True
                    async with http.stream("POST", path, json=body) as r:
                        if r.status_code != 200:
                            stats["failed"].append((kind, r.status_code, (await r.aread())[:200]))
                            continue
                        n = 0
                        async for line in r.aiter_lines():
                            n += line.startswith("data: ")
                            if kind == "cancel" and n == 3:
                                break  # hang up mid-stream
                        stats["cancelled" if kind == "cancel" else "ok"] += 1
                else:
                    r = await http.post(path, json=body)
                    if r.status_code != 200:
                        stats["failed"].append((kind, r.status_code, r.text[:200]))
                    else:
                        stats["ok"] += 1
            except httpx.HTTPError as e:
                stats["failed"].append((kind, type(e).__name__, str(e)[:200]))


async def _all(url: str, seed: int, until: float, stats: dict) -> None:
    await asyncio.wait_for(asyncio.gather(*[_client(url, seed + i, until, stats) for i in range(CLIENTS)]),
                           until - time.time() + 300)


def test_sixteen_clients_mixed_and_cancelling(reasoner):
    model, tok = gptlab.load(reasoner), gptlab.load_tokenizer(reasoner)
    app = create_app(ServeConfig(model="m", max_batch=16), model, tok)
    with running(app) as url:
        stats = {"ok": 0, "cancelled": 0, "failed": []}
        warm = time.time() + min(4.0, SECONDS / 4)
        asyncio.run(_all(url, 0, warm, stats))
        before = _rss_mb()
        asyncio.run(_all(url, 100, time.time() + SECONDS, stats))
        deadline = time.time() + 30
        while app.state.gptlab.engine.stats()["running"] and time.time() < deadline:
            time.sleep(0.05)
        s = app.state.gptlab.engine.stats()
        after = _rss_mb()
    assert not stats["failed"], stats["failed"][:5]
    assert stats["ok"] > CLIENTS and stats["cancelled"] > 0
    assert s["running"] == 0 and s["waiting"] == 0 and s["kv_cache_usage"] == 0
    assert after - before < 64, f"memory grew {after - before:.0f} MB under load ({before:.0f} -> {after:.0f} MB)"
