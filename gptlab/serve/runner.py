"""The engine on a thread of its own, for an asyncio server: requests go in from the event loop, each one's
deltas come back on an asyncio queue, and the thread keeps stepping while anything is unfinished.

Time to first token and inter-token latency are measured here, where each delta leaves the engine.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Protocol

from gptlab.infer.engine import Delta, Engine
from gptlab.infer.sampling import Sampling


class Observer(Protocol):
    def first_token(self, seconds: float) -> None: ...

    def token_gap(self, seconds: float) -> None: ...

    def finished(self, reason: str) -> None: ...


class AsyncEngine:
    def __init__(self, engine: Engine, observer: Observer | None = None) -> None:
        self.engine = engine
        self.observer = observer
        self.lock = threading.Lock()  # the engine is touched by one thread at a time
        self.wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, int]] = {}
        self._times: dict[tuple[str, int], float] = {}  # (request, sample) -> when its last token left
        self._seen: set[tuple[str, int]] = set()  # samples that have had their first token
        self._stop = False
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="gptlab-engine", daemon=True)
        self.thread.start()

    # ---- from the event loop ----
    def submit(self, prompt: list[int], sampling: Sampling) -> tuple[str, asyncio.Queue]:
        """Queue a request; raises what Engine.add_request raises (bad input, QueueFull) at once."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self.lock:
            rid = self.engine.add_request(prompt, sampling)
            self._queues[rid] = (loop, queue, sampling.n)
            start = time.perf_counter()
            for i in range(sampling.n):
                self._times[(rid, i)] = start
        self.wake.set()
        return rid, queue

    def abort(self, rid: str) -> None:
        """Stop a request (the client left); a no-op once it has finished."""
        with self.lock:
            seqs = self.engine.requests.get(rid, [])
            if self.observer is not None:
                for seq in seqs:
                    if seq.data.out.finish_reason is None:
                        self.observer.finished("abort")
            self.engine.abort(rid)
            self._drop(rid)

    def num_cached(self, rid: str) -> int:
        with self.lock:
            return self.engine.output(rid).num_cached_tokens if rid in self.engine.requests else 0

    async def deltas(self, rid: str, queue: asyncio.Queue) -> AsyncIterator[Delta]:
        """The request's deltas until all its samples are finished."""
        left = self._queues[rid][2] if rid in self._queues else 0
        while left:
            d = await queue.get()
            if isinstance(d, BaseException):
                raise d
            yield d
            left -= d.finished

    def stats(self) -> dict[str, float]:
        with self.lock:
            return self.engine.stats()

    def close(self) -> None:
        self._stop = True
        self.wake.set()
        self.thread.join(timeout=30)

    # ---- on the engine thread ----
    def _drop(self, rid: str) -> None:
        self._queues.pop(rid, None)
        for key in [k for k in self._times if k[0] == rid]:
            del self._times[key]
            self._seen.discard(key)
        self.engine.requests.pop(rid, None)

    def _run(self) -> None:
        while not self._stop:
            with self.lock:
                busy = self.engine.has_unfinished()
                try:
                    deltas = self.engine.step() if busy else []
                except Exception as e:  # a bug in gptlab: fail the requests in flight, keep serving
                    self._fail(e)
                    deltas = []
                now = time.perf_counter()
                for d in deltas:
                    self._deliver(d, now)
            if not busy:
                self.wake.wait(timeout=0.5)
                self.wake.clear()

    def _deliver(self, d: Delta, now: float) -> None:
        entry = self._queues.get(d.request_id)
        if entry is None:
            return
        loop, queue, _ = entry
        key = (d.request_id, d.index)
        if d.token_ids and key in self._times:
            if self.observer is not None:
                gap = now - self._times[key]
                self.observer.token_gap(gap) if key in self._seen else self.observer.first_token(gap)
            self._seen.add(key)
            self._times[key] = now
        if d.finished:
            if self.observer is not None:
                self.observer.finished(d.finish_reason)
            self._seen.discard(key)
            self._times.pop(key, None)
            if not any(k[0] == d.request_id for k in self._times):
                self._queues.pop(d.request_id, None)
                self.engine.requests.pop(d.request_id, None)
        loop.call_soon_threadsafe(queue.put_nowait, d)

    def _fail(self, e: BaseException) -> None:
        for rid, (loop, queue, _) in list(self._queues.items()):
            self.engine.abort(rid)
            loop.call_soon_threadsafe(queue.put_nowait, RuntimeError(f"the engine failed: {e}"))
            self._drop(rid)
