"""`gptlab serve`: an OpenAI-compatible HTTP server (FastAPI) over the continuously batching engine.

    app = create_app(ServeConfig(model="out/python-docs/final", api_key="secret"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: GET /v1/models (the base and its LoRA adapters), POST /v1/completions, POST /v1/chat/completions
(the model's chat template, Qwen3 reasoning returned apart as `reasoning_content`, `thinking_token_budget`,
tools), GET /health (503 while the model loads), GET /metrics (Prometheus), POST /tokenize and /detokenize,
GET / (the playground). Both endpoints take response_format / structured_outputs (serve/structured.py); a
request's `model` naming an adapter runs its rows through that adapter, in the same batches as the others.
With a draft model (`draft`), the engine decodes speculatively (gptlab/infer/speculative.py).
Errors use OpenAI's body; client input never gets a 500. docs/serving.md has the fields, defaults and limits.
"""

from __future__ import annotations

import asyncio
import json
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptlab.errors import GptlabError
from gptlab.infer.engine import Engine, EngineConfig, QueueFull
from gptlab.infer.sampling import Sampling
from gptlab.infer.structured import Constraint
from gptlab.infer.text import stop_ids
from gptlab.serve import render
from gptlab.serve.metrics import CONTENT_TYPE, Metrics
from gptlab.serve.protocol import (ApiError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                   TokenizeRequest, error_body)
from gptlab.serve.runner import AsyncEngine
from gptlab.serve.structured import Tools, request_constraint, template_turns

PLAYGROUND = Path(__file__).with_name("playground") / "index.html"
OPEN_PATHS = {"/health", "/", "/favicon.ico"}  # no key needed: the health probe and the playground page itself


@dataclass
class ServeConfig:
    model: str = ""  # model dir or hub id
    served_model_name: str | None = None  # the name clients pass as `model` (default: `model` as given)
    api_key: str | None = None  # require `Authorization: Bearer KEY` on every route but /health and the page
    max_batch: int = 32  # sequences generated at once
    max_batched_tokens: int = 512  # tokens per forward pass (prompt chunks + decodes)
    kv_cache_memory: str | None = None  # KV pool size, e.g. 2GiB (default: max_batch full contexts, <= 2 GiB)
    thinking_budget: int | None = None  # default reasoning-token budget (a request's thinking_token_budget wins)
    max_tokens: int | None = None  # the largest max_tokens a request may ask (default: the context length)
    max_n: int = 16  # the largest n
    max_waiting: int = 256  # queued requests beyond the batch; more get 503
    max_body_bytes: int = 4 << 20  # larger request bodies get 413
    dtype: str | None = None
    quantize: str | None = None  # int8 / int4 integer weights (gptlab/models/quant.py)
    device: str = "cpu"
    lora: dict[str, str] = field(default_factory=dict)  # {served name: PEFT adapter dir}, beside the base
    draft: str | None = None  # a small model dir of the same tokenizer: speculative decoding
    draft_tokens: int = 4  # tokens the draft proposes per step for each decoding request


class State:
    """What the routes share: the loaded model, its engine thread and metrics (None until loaded)."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.name = cfg.served_model_name or cfg.model
        self.ready = False
        self.load_error: str | None = None
        self.model = self.tokenizer = self.engine = self.metrics = None
        self.end_of_turn: set[int] = set()
        self.turn_stops: list[str] = []
        self.adapters: list[str] = []
        self.grammar_error: str | None = None  # why constrained requests cannot be served (None: they can)
        self.on_error = None  # called with the message when loading fails (the CLI stops the server)

    def load(self) -> None:
        from gptlab.errors import reason
        from gptlab.formats import hf
        from gptlab.tokenizer import load_tokenizer

        c = self.cfg
        try:
            tokenizer = load_tokenizer(c.model)
            model = hf.load(c.model, dtype=c.dtype, device=c.device, quantize=c.quantize)
            draft = None
            if c.draft is not None:
                from gptlab.infer.speculative import load_draft

                draft = load_draft(c.draft, model, tokenizer, dtype=c.dtype, device=c.device, quantize=c.quantize)
            self.start(model, tokenizer, draft)
        except Exception as e:  # the thread must not die silently: report it, and /health says so
            self.load_error = str(e) if isinstance(e, GptlabError) else f"could not load {self.cfg.model}: {reason(e)}"
            if self.on_error is not None:
                self.on_error(self.load_error)

    def start(self, model, tokenizer, draft=None) -> None:
        c = self.cfg
        if c.lora:
            from gptlab.formats.peft import load_adapter

            for name, path in c.lora.items():
                load_adapter(model, path, name=name)
            self.adapters = list(c.lora)
        engine = Engine(model, tokenizer, EngineConfig(max_batch=c.max_batch, max_batched_tokens=c.max_batched_tokens,
                                                       kv_cache_memory=c.kv_cache_memory, max_waiting=c.max_waiting,
                                                       draft_tokens=c.draft_tokens), draft=draft)
        self.model, self.tokenizer = model, tokenizer
        self.metrics = Metrics(lambda: self.engine.stats())
        self.engine = AsyncEngine(engine, self.metrics)
        if tokenizer.chat_template:
            from gptlab.infer.chat import end_of_turn

            try:
                for marker in end_of_turn(tokenizer):  # <|im_end|>: a single token ends the turn as EOS does
                    ids = tokenizer.encode(marker)
                    (self.end_of_turn.update(ids) if len(ids) == 1 else self.turn_stops.append(marker))
            except GptlabError:
                pass  # a template that cannot render the probe: the model's EOS alone ends a reply
        try:
            engine.grammars  # the tokenizer's grammar view, built once now rather than on the first request
        except GptlabError as e:
            self.grammar_error = str(e)
        self.ready = True

    def check(self, model: str | None) -> str | None:
        """503 until loaded; 404 for a model this server does not serve. Returns the adapter `model` names
        (None: the base)."""
        if not self.ready:
            raise ApiError(503, self.load_error or "the model is still loading", type="server_error")
        if model is None or model == self.name:
            return None
        if model in self.adapters:
            return model
        served = ", ".join(f"`{n}`" for n in [self.name, *self.adapters])
        raise ApiError(404, f"The model `{model}` does not exist (this server serves {served}).", "model",
                       code="model_not_found")

    def constraint(self, c: Constraint | None) -> Constraint | None:
        if c is not None and self.grammar_error is not None:
            raise ApiError(400, f"structured outputs are not available with this tokenizer: {self.grammar_error}")
        return c

    @property
    def context(self) -> int:
        return self.model.config.context_length


# ---------------------------------------------------------------------------------------------------------
# request -> engine


def _sampling(state: State, req, prompt_len: int, max_tokens: int | None, eos: set[int] | None,
              stops: list[str], logprobs: int | None, thinking: int | None, param: str,
              default: int | None = None, constraint: Constraint | None = None) -> Sampling:
    """default: max_tokens when the request gives none (completions: 16, as OpenAI; chat: what fits)."""
    cfg, ctx = state.cfg, state.context
    cap = min(cfg.max_tokens or ctx, ctx)
    if prompt_len >= ctx:
        raise ApiError(400, f"This model's maximum context length is {ctx} tokens, and the {param} has {prompt_len}; "
                            f"shorten it.", param)
    if max_tokens is not None and max_tokens > cap:
        raise ApiError(400, f"max_tokens={max_tokens} is above this server's limit of {cap}", "max_tokens")
    if max_tokens is not None and prompt_len + max_tokens > ctx:
        raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                            f"{prompt_len + max_tokens} tokens ({prompt_len} in the {param}, {max_tokens} in the "
                            f"completion). Please reduce the length of the {param} or the completion.", "max_tokens")
    if req.n > cfg.max_n:
        raise ApiError(400, f"n={req.n} is above this server's limit of {cfg.max_n}", "n")
    try:
        return Sampling(
            max_new_tokens=max_tokens if max_tokens is not None else min(default or cap, cap, ctx - prompt_len),
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=req.top_k if req.top_k not in (None, -1, 0) else None, top_p=req.top_p, min_p=req.min_p or None,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0, stop=stops, seed=req.seed, n=req.n,
            eos_id=sorted(eos) if eos is not None else None, logprobs=logprobs, thinking_budget=thinking,
            constraint=constraint,
        )
    except GptlabError as e:
        raise ApiError(400, str(e)) from None


def _token_ids(state: State, prompt) -> list[list[int]]:
    """A completion request's prompt(s) as token id lists."""
    if isinstance(prompt, str):
        return [state.tokenizer.encode(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return [state.tokenizer.encode(p) for p in prompt]
    lists = [prompt] if all(isinstance(t, int) for t in prompt) else prompt
    vocab = state.model.config.vocab_size
    for ids in lists:
        if any(not 0 <= t < vocab for t in ids):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
    return [list(ids) for ids in lists]


async def _submit(state: State, ids: list[int], s: Sampling, adapter: str | None):
    try:
        return await state.engine.submit(ids, s, adapter)
    except QueueFull as e:
        raise ApiError(503, f"{e}; try again shortly", type="server_error", code="queue_full") from None
    except GptlabError as e:
        raise ApiError(400, str(e)) from None


async def _wait(request: Request, state: State, rids: list[str], work) -> Any:
    """Run `work` (a coroutine reading the requests' deltas); if the client goes away first, abort them."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise asyncio.CancelledError
    finally:
        for rid in rids:
            state.engine.abort(rid)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------------------------------------
# the app


def create_app(cfg: ServeConfig, model=None, tokenizer=None, draft=None) -> FastAPI:
    """The server's ASGI app. With `model` and `tokenizer` (and a `draft` model) it serves those (tests); else
    it loads cfg.model (and cfg.draft) in the background at start-up, answering 503 on /health until ready."""
    state = State(cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if model is not None:
            state.start(model, tokenizer, draft)
        else:
            threading.Thread(target=state.load, name="gptlab-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.close()

    app = FastAPI(title="gptlab", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible completions and chat over gptlab's engine.")
    app.state.gptlab = state
    _errors(app)
    _publish_model_names(app, [state.name, *cfg.lora])
    app.add_middleware(_Guard, api_key=cfg.api_key, max_body=cfg.max_body_bytes)

    @app.get("/health")
    async def health():
        if state.ready:
            return {"status": "ok"}
        return JSONResponse(error_body(state.load_error or "the model is loading", "server_error"), status_code=503)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground():
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models():
        state.check(None)
        base = {"id": state.name, "object": "model", "created": 0, "owned_by": "gptlab", "root": state.name,
                "parent": None, "max_model_len": state.context}
        return {"object": "list", "data": [base] + [{**base, "id": name, "parent": state.name}
                                                    for name in state.adapters]}

    @app.get("/metrics")
    async def metrics():
        state.check(None)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        state.check(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "pass exactly one of prompt and messages", "prompt")
        if req.prompt is not None:
            text = req.prompt
        else:
            tools = Tools(req.tools, None, False).for_template()
            text = _render(state, template_turns(req.messages), {"tools": tools} if tools else {},
                           req.add_generation_prompt)
        ids = state.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.context}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        state.check(req.model)
        if any(not 0 <= t < state.model.config.vocab_size for t in req.tokens):
            raise ApiError(400, f"token ids must be in [0, {state.model.config.vocab_size})", "tokens")
        return {"prompt": state.tokenizer.decode(req.tokens)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        adapter = state.check(req.model)
        constraint = state.constraint(request_constraint(req))
        prompts = _token_ids(state, req.prompt)
        subs = []
        try:
            for ids in prompts:
                s = _sampling(state, req, max(1, len(ids)), req.max_tokens, None, req.stop_list(), req.logprobs, None,
                              "prompt", default=16, constraint=constraint)
                subs.append(await _submit(state, ids, s, adapter))
        except ApiError:
            for rid, _ in subs:  # a later prompt of the batch was refused: none of it runs
                state.engine.abort(rid)
            raise
        rids = [rid for rid, _ in subs]
        job = render.Completion(req.model or state.name, state.tokenizer, prompts, req.n, req.echo, req.logprobs is not None)
        if req.stream:
            return StreamingResponse(_stream_completion(state, job, subs, req), media_type="text/event-stream")

        async def work():
            for p, (rid, queue) in enumerate(subs):
                async for d in state.engine.deltas(rid, queue, req.n):
                    job.add(p, d)
            return job.response()

        return await _wait(request, state, rids, work())

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        adapter = state.check(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        constraint = request_constraint(req)
        tools = Tools(req.tools, req.tool_choice, constraint is not None)
        constraint = state.constraint(constraint or tools.constraint(state.tokenizer))
        kwargs = dict(req.chat_template_kwargs or {})
        if tools.active:
            if "tools" not in (state.tokenizer.chat_template or ""):
                raise ApiError(400, "this model's chat template does not take tools", "tools")
            kwargs["tools"] = tools.for_template()
        text = _render(state, template_turns(req.messages), kwargs, True)
        ids = state.tokenizer.encode(text)
        eos = stop_ids(state.model.config, None, state.tokenizer) | state.end_of_turn
        budget = req.thinking_token_budget if req.thinking_token_budget is not None else state.cfg.thinking_budget
        s = _sampling(state, req, len(ids), req.max_completion_tokens or req.max_tokens, eos,
                      req.stop_list() + state.turn_stops, (req.top_logprobs or 0) if req.logprobs else None, budget,
                      "messages", constraint=constraint)
        rid, queue = await _submit(state, ids, s, adapter)
        job = render.Chat(req.model or state.name, state.tokenizer, len(ids), req.n, req.logprobs,
                          state.engine.engine.opened_thinking(ids), tools=tools.active)
        if req.stream:
            return StreamingResponse(_stream_chat(state, job, rid, queue, req), media_type="text/event-stream")

        async def work():
            async for d in state.engine.deltas(rid, queue, req.n):
                job.add(d)
            return job.response()

        return await _wait(request, state, [rid], work())

    return app


def _publish_model_names(app: FastAPI, names: list[str]) -> None:
    """/openapi.json says which `model`s this server takes (an enum), so clients and fuzzers know them."""
    make = app.openapi

    def openapi() -> dict:
        schema = make()
        for component in schema.get("components", {}).get("schemas", {}).values():
            prop = component.get("properties", {}).get("model")
            if prop is not None:
                prop.pop("anyOf", None)
                prop.update(type="string", enum=names)
        return schema

    app.openapi = openapi


def _render(state: State, turns: list[dict], kwargs: dict, add_generation_prompt: bool) -> str:
    if not state.tokenizer.chat_template:
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
    try:
        return state.tokenizer.apply_chat_template(turns, add_generation_prompt=add_generation_prompt, **kwargs)
    except GptlabError as e:
        raise ApiError(400, str(e), "messages") from None
    except TypeError as e:  # chat_template_kwargs naming a variable the renderer takes itself
        raise ApiError(400, f"chat_template_kwargs: {e}", "chat_template_kwargs") from None


async def _stream_completion(state: State, job, subs, req):
    try:
        for p, (rid, queue) in enumerate(subs):
            for chunk in job.first_chunks(p):
                yield _sse(chunk)
            async for d in state.engine.deltas(rid, queue, req.n):
                yield _sse(job.chunk(p, d))
        if req.stream_options and req.stream_options.include_usage:
            yield _sse(job.usage_chunk())
        yield "data: [DONE]\n\n"
    finally:
        for rid, _ in subs:
            state.engine.abort(rid)


async def _stream_chat(state: State, job, rid, queue, req):
    try:
        for chunk in job.first_chunks():
            yield _sse(chunk)
        async for d in state.engine.deltas(rid, queue, req.n):
            for chunk in job.chunks(d):
                yield _sse(chunk)
        if req.stream_options and req.stream_options.include_usage:
            yield _sse(job.usage_chunk())
        yield "data: [DONE]\n\n"
    finally:
        state.engine.abort(rid)


# ---------------------------------------------------------------------------------------------------------
# errors, auth and limits


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the request body is not valid JSON: {first.get('msg')}"), status_code=400)
        where = ".".join(loc) or "body"
        return JSONResponse(error_body(f"{where}: {first.get('msg')}", param=loc[0] if loc else None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception):  # a gptlab bug, never the client's input: no trace in the body
        return JSONResponse(error_body(f"internal error ({type(e).__name__})", "server_error"), status_code=500)


class _Guard:
    """ASGI middleware: the API key on every route but OPEN_PATHS, and a cap on request bodies."""

    def __init__(self, app, api_key: str | None, max_body: int) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and scope["path"] not in OPEN_PATHS:
            given = headers.get("authorization", "")
            if given != f"Bearer {self.api_key}":
                msg = "Incorrect API key provided." if given else "Missing API key: send Authorization: Bearer KEY."
                return await _reply(send, 401, error_body(msg, code="invalid_api_key"))
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return await _reply(send, 413, error_body(f"the request body is over {self.max_body} bytes"))
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise ApiError(413, f"the request body is over {self.max_body} bytes")
            return message

        return await self.app(scope, limited, send)


async def _reply(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def _version() -> str:
    from gptlab import __version__

    return __version__
