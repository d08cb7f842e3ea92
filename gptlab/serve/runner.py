"""The engine on a thread of its own, for an asyncio server: requests go in from the event loop, each one's
deltas come back on an asyncio queue, and the thread keeps stepping while anything is unfinished.

Only the engine thread touches the engine. The event loop never waits for a step: it hands over commands
(add, abort) on a queue the thread drains between steps, and gets answers through futures and queues, so a
35 ms forward pass never stalls the sockets. Time to first token and inter-token latency are measured on
the engine thread, where each delta leaves the engine.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

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
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, int]] = {}
        self._times: dict[tuple[str, int], float] = {}  # (request, sample) -> when its last token left
        self._seen: set[tuple[str, int]] = set()  # samples that have had their first token
        self._stats = engine.stats()  # a snapshot, replaced after every step (read from any thread)
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="gptlab-engine", daemon=True)
        self.thread.start()

    # ---- from the event loop ----
    async def submit(self, prompt: list[int], sampling: Sampling, adapter: str | None = None
                     ) -> tuple[str, asyncio.Queue]:
        """Queue a request (through a named LoRA adapter, or the base); raises what Engine.add_request raises
        (bad input, QueueFull)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        deltas: asyncio.Queue = asyncio.Queue()
        self._commands.put(("add", (prompt, sampling, adapter, loop, done, deltas)))
        self._wake.set()
        return await done, deltas

    def abort(self, rid: str) -> None:
        """Stop a request (the client left); a no-op once it has finished. Does not wait."""
        self._commands.put(("abort", rid))
        self._wake.set()

    async def deltas(self, rid: str, deltas: asyncio.Queue, n: int) -> AsyncIterator[Delta]:
        """The request's deltas until all its n samples are finished."""
        left = n
        while left:
            d = await deltas.get()
            if isinstance(d, BaseException):
                raise d
            yield d
            left -= d.finished

    def stats(self) -> dict[str, float]:
        return dict(self._stats)

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self.thread.join(timeout=30)

    # ---- on the engine thread ----
    def _apply(self, command: str, arg: Any) -> None:
        if command == "add":
            prompt, sampling, adapter, loop, done, deltas = arg
            try:
                rid = self.engine.add_request(prompt, sampling, adapter=adapter)
            except Exception as e:  # bad input or a full queue: the route turns it into its status
                loop.call_soon_threadsafe(self._resolve, done, None, e)
                return
            self._queues[rid] = (loop, deltas, sampling.n)
            start = time.perf_counter()
            for i in range(sampling.n):
                self._times[(rid, i)] = start
            loop.call_soon_threadsafe(self._resolve, done, rid, None)
        else:
            seqs = self.engine.requests.get(arg, [])
            if self.observer is not None:
                for seq in seqs:
                    if seq.data.out.finish_reason is None:
                        self.observer.finished("abort")
            self.engine.abort(arg)
            self._drop(arg)

    def _drop(self, rid: str) -> None:
        self._queues.pop(rid, None)
        for key in [k for k in self._times if k[0] == rid]:
            del self._times[key]
            self._seen.discard(key)
        self.engine.requests.pop(rid, None)

    def _run(self) -> None:
        while not self._stop:
            while True:
                try:
                    self._apply(*self._commands.get_nowait())
                except queue.Empty:
                    break
            busy = self.engine.has_unfinished()
            if busy:
                try:
                    deltas = self.engine.step()
                except Exception as e:  # a bug in gptlab: fail the requests in flight, keep serving
                    self._fail(e)
                    deltas = []
                now = time.perf_counter()
                for d in deltas:
                    self._deliver(d, now)
            self._stats = self.engine.stats()
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    def _deliver(self, d: Delta, now: float) -> None:
        entry = self._queues.get(d.request_id)
        if entry is None:
            return
        loop, deltas, _ = entry
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
        loop.call_soon_threadsafe(deltas.put_nowait, d)

    def _fail(self, e: BaseException) -> None:
        for rid, (loop, deltas, _) in list(self._queues.items()):
            self.engine.abort(rid)
            loop.call_soon_threadsafe(deltas.put_nowait, RuntimeError(f"the engine failed: {e}"))
            self._drop(rid)

    def _resolve(self, future: asyncio.Future, rid: str | None, error: BaseException | None) -> None:
        """On the event loop: hand submit() its answer; a caller that has gone meanwhile gets its request aborted."""
        if future.cancelled():
            if rid is not None:
                self.abort(rid)
        elif error is not None:
            future.set_exception(error)
        else:
            future.set_result(rid)
