"""A teacher LLM behind any OpenAI-compatible chat endpoint (gptlab serve, vLLM, a hosted API).

Calls go through the official `openai` client with its own retries off, so every retry is ours and counted:
rate limits (429), server errors (5xx), timeouts and refused connections are retried with exponential
backoff (honouring Retry-After) up to `max_retries` times; a wrong API key (401/403), an unknown model
(404) or a refused request (400) stops the run at once with one error. Up to `concurrency` calls run at once.

Every reply is appended to a cache file (one JSON line each, fsynced) keyed by the request, so a rerun
after a crash, or with other filters, pays only for pages not yet asked. The cache is plain JSON: never
unpickled, and a damaged line is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.synth.documents import Page
from gptlab.synth.prompt import ReplyError, messages, pairs_schema, parse_pairs

# servers known to enforce a JSON schema in response_format, by /v1/models "owned_by"
SCHEMA_SERVERS = ("gptlab", "vllm")


@dataclass
class TeacherStats:
    calls: int = 0  # requests answered by the teacher in this run
    cached: int = 0  # pages answered from the cache
    retries: int = 0
    unreadable: int = 0  # replies with no readable pairs
    prompt_tokens: int = 0
    completion_tokens: int = 0
    schema: bool = False  # response_format with pairs_schema was sent

    def as_dict(self) -> dict:
        return asdict(self)


class ReplyCache:
    """Teacher replies by request key, in an append-only JSONL file."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.entries, self._lock = path, {}, threading.Lock()
        if path is not None and path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut by a crash: that page is asked again

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, reply: str, usage: dict) -> None:
        entry = {"key": key, "reply": reply, "usage": usage}
        with self._lock:
            self.entries[key] = entry
            if self.path is None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())


class ChatTeacher:
    def __init__(self, url: str, model: str, api_key: str | None = None, concurrency: int = 4, max_retries: int = 5,
                 timeout: float = 300.0, temperature: float = 0.3, response_format: str = "auto",
                 max_answer_chars: int = 300, cache_path: Path | None = None) -> None:
        import openai

        if not url.startswith(("http://", "https://")):
            raise GptlabError(f"--teacher must be an http(s) URL of an OpenAI-compatible API or 'extractive', got {url!r}")
        if response_format not in ("auto", "schema", "none"):
            raise GptlabError(f"--response-format must be auto, schema or none, got {response_format!r}")
        self.url, self.model, self.concurrency, self.max_retries = url.rstrip("/"), model, concurrency, max_retries
        self.temperature, self.response_format, self.max_answer_chars = temperature, response_format, max_answer_chars
        key = api_key or os.environ.get("OPENAI_API_KEY") or "none"
        self.client = openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=timeout)
        self.cache = ReplyCache(cache_path)
        self.stats = TeacherStats()
        self._lock = threading.Lock()

    # -----------------------------------------------------------------------------------------------------
    # one request, with our retries

    def _fatal(self, e: Exception) -> GptlabError:
        import openai

        status = getattr(e, "status_code", None)
        body = getattr(e, "message", str(e))
        if isinstance(e, (openai.AuthenticationError, openai.PermissionDeniedError)):
            return GptlabError(f"the teacher at {self.url} refused the API key ({status}: {body}); pass the right --api-key")
        if isinstance(e, openai.NotFoundError):
            return GptlabError(f"the teacher at {self.url} answered 404 ({body}): is --teacher-model {self.model!r} "
                               "served there, and is the URL the API root (ending in /v1)?")
        return GptlabError(f"the teacher at {self.url} refused the request ({status}: {body})")

    def _retrying(self, request, tolerate: tuple[int, ...] = ()):
        """request(), retried on 429, 5xx (a server still loading its model answers 503), timeouts and refused
        connections; a status in `tolerate` gives None; other statuses stop the run with one error."""
        import openai

        for attempt in range(self.max_retries + 1):
            try:
                return request()
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as e:
                if attempt == self.max_retries:
                    if isinstance(e, openai.APIConnectionError):
                        raise GptlabError(f"cannot reach the teacher at {self.url} ({type(e).__name__}: {e}) after "
                                          f"{attempt + 1} tries") from None
                    raise GptlabError(f"the teacher at {self.url} kept failing ({getattr(e, 'status_code', '')} "
                                      f"{type(e).__name__}) after {attempt + 1} tries") from None
                with self._lock:
                    self.stats.retries += 1
                time.sleep(self._backoff(e, attempt))
            except openai.APIStatusError as e:
                if e.status_code in tolerate:
                    return None
                raise self._fatal(e) from None
        raise AssertionError("unreachable")

    def _call(self, msgs: list[dict], schema: dict | None) -> tuple[str, dict]:
        extra = {}
        if schema:
            extra["response_format"] = {"type": "json_schema",
                                        "json_schema": {"name": "qa_pairs", "schema": schema, "strict": True}}
        r = self._retrying(lambda: self.client.chat.completions.create(
            model=self.model, messages=msgs, temperature=self.temperature, **extra))
        content = r.choices[0].message.content if r.choices else None
        usage = {"prompt_tokens": getattr(r.usage, "prompt_tokens", 0) or 0,
                 "completion_tokens": getattr(r.usage, "completion_tokens", 0) or 0}
        return content or "", usage

    @staticmethod
    def _backoff(e: Exception, attempt: int) -> float:
        response = getattr(e, "response", None)
        after = response.headers.get("retry-after") if response is not None else None
        try:
            if after is not None:
                return min(float(after), 60.0)
        except ValueError:
            pass
        return min(30.0, 0.25 * 2 ** attempt) * (0.5 + random.random() / 2)

    def _wants_schema(self) -> bool:
        if self.response_format != "auto":
            return self.response_format == "schema"
        models = self._retrying(lambda: list(self.client.models.list()), tolerate=(400, 404, 405, 422))
        return any(getattr(m, "owned_by", "") in SCHEMA_SERVERS for m in models or [])  # no list: no schema

    # -----------------------------------------------------------------------------------------------------
    # all pages

    def key(self, msgs: list[dict], schema: bool) -> str:
        spec = {"model": self.model, "messages": msgs, "temperature": self.temperature, "schema": schema}
        return hashlib.sha256(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def ask(self, pages: list[Page], n_pairs: int, numeric_share: float,
            progress: bool = True) -> list[list[tuple[str, str]]]:
        """The pairs the teacher wrote for each page ([] for an unreadable reply)."""
        from tqdm.auto import tqdm

        requests = [messages(p, n_pairs, numeric_share) for p in pages]
        cached = [self.cache.get(self.key(m, s)) for m in requests for s in (False, True)]
        pending = [i for i in range(len(pages)) if cached[2 * i] is None and cached[2 * i + 1] is None]
        schema = self._wants_schema() if pending else False
        self.stats.schema = schema
        replies: list[str | None] = [None] * len(pages)
        for i in range(len(pages)):
            hit = cached[2 * i + 1] or cached[2 * i]
            if hit is not None:
                replies[i] = hit["reply"]
                self.stats.cached += 1

        shape = pairs_schema(n_pairs, self.max_answer_chars) if schema else None

        def one(i: int) -> tuple[int, str]:
            reply, usage = self._call(requests[i], shape)
            self.cache.put(self.key(requests[i], schema), reply, usage)
            with self._lock:
                self.stats.calls += 1
                self.stats.prompt_tokens += usage["prompt_tokens"]
                self.stats.completion_tokens += usage["completion_tokens"]
            return i, reply

        with tqdm(total=len(pending), desc="teacher", unit="page", disable=not progress or not pending) as bar, \
                ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            futures = [pool.submit(one, i) for i in pending]
            try:
                for f in as_completed(futures):
                    i, reply = f.result()
                    replies[i] = reply
                    bar.update(1)
            except GptlabError as e:
                for f in futures:
                    f.cancel()
                kept = len(self.cache.entries)
                where = f" in {self.cache.path}" if self.cache.path else ""
                raise GptlabError(f"{e}; the {kept} replies received so far are kept{where}, and a rerun reuses "
                                  "them") from None

        out = []
        for reply in replies:
            try:
                out.append(parse_pairs(reply or ""))
            except ReplyError:
                self.stats.unreadable += 1
                out.append([])
        return out
