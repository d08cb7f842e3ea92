"""`gptlab serve`: the OpenAI-compatible server (gptlab.serve.app) under uvicorn."""

from __future__ import annotations

import os
import signal
import sys
from typing import Literal

from gptlab.cli import command
from gptlab.errors import GptlabError
from gptlab.limits import check


@command("serve")
def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_batch: int = 32,
    max_batched_tokens: int = 512,
    kv_cache_memory: str | None = None,
    thinking_budget: int | None = None,
    max_tokens: int | None = None,
    max_n: int = 16,
    max_waiting: int = 256,
    dtype: str | None = None,
    quantize: Literal["int8", "int4"] | None = None,
    device: str = "cpu",
    lora: list[str] | None = None,
    draft: str | None = None,
    draft_tokens: int = 4,
    log_level: str = "info",
) -> int:
    """Serve a model over an OpenAI-compatible HTTP API, with a chat playground at http://HOST:PORT/.

    /v1/completions and /v1/chat/completions (streaming, n, stop, seed, logprobs, Qwen3 reasoning apart as
    reasoning_content and a thinking_token_budget), response_format / structured_outputs constraints, tools,
    /v1/models, /health, /metrics, /tokenize, /detokenize. --lora NAME=DIR serves a PEFT adapter beside the
    base as model NAME; requests for different adapters share the engine's batches. --draft DIR decodes
    speculatively with a small model of the same tokenizer (the same output; /metrics counts its acceptance).
    Binds to 127.0.0.1 unless told otherwise; SIGTERM finishes the requests in flight, then exits.
    docs/serving.md has every field.

    Args:
        model: HF model dir or hub id
        host: address to bind (0.0.0.0 exposes it to the network: set --api-key)
        port: TCP port
        api_key: require `Authorization: Bearer KEY` (default: $GPTLAB_API_KEY; none: open)
        served_model_name: the `model` name clients use (default: MODEL as given)
        max_batch: sequences generated at once
        max_batched_tokens: tokens per forward pass (prompt chunks + decodes)
        kv_cache_memory: KV-cache pool, e.g. 2GiB (default: max_batch contexts, <= 2 GiB)
        thinking_budget: default reasoning-token budget for chat (requests may override)
        max_tokens: the largest max_tokens a request may ask (default: the context)
        max_n: the largest n a request may ask
        max_waiting: queued requests; more are answered 503
        dtype: float32, bfloat16 or float16 (default: the checkpoint's)
        quantize: int8 or int4: integer weights, faster CPU decode (not with --lora)
        device: cpu, cuda, ...
        lora: NAME=DIR, a PEFT LoRA adapter dir served as model NAME (repeat for more)
        draft: a small model dir of the same tokenizer proposing tokens for the model to check (not with --lora)
        draft_tokens: tokens the draft proposes per step for each request (1-16)
        log_level: uvicorn's: critical, error, warning, info, debug
    """
    import uvicorn

    from gptlab.formats import hf
    from gptlab.serve.app import ServeConfig, create_app

    check("port", port)
    if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
        raise GptlabError(f"log_level must be critical, error, warning, info or debug, got {log_level!r}")
    # a bad model fails here, before the server starts
    config = hf.read_config(hf.resolve(model, hf.HUB_CONFIG_PATTERNS))
    adapters = _adapters(lora or [], served_model_name or model)
    if quantize and adapters:
        raise GptlabError("--quantize cannot be combined with --lora: adapters attach to full-precision layers")
    if draft is not None:
        _check_draft(model, config, draft, draft_tokens, adapters)
    key = api_key or os.environ.get("GPTLAB_API_KEY") or None
    cfg = ServeConfig(model=model, served_model_name=served_model_name, api_key=key, max_batch=max_batch,
                      max_batched_tokens=max_batched_tokens, kv_cache_memory=kv_cache_memory,
                      thinking_budget=thinking_budget, max_tokens=max_tokens, max_n=max_n, max_waiting=max_waiting,
                      dtype=dtype, quantize=quantize, device=device, lora=adapters, draft=draft,
                      draft_tokens=draft_tokens)
    app = create_app(cfg)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=60))
    state = app.state.gptlab

    def failed(message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        server.should_exit = True

    state.on_error = failed
    if host not in ("127.0.0.1", "localhost", "::1") and not key:
        print(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", file=sys.stderr)
    # uvicorn drains on SIGTERM, then raises the signal again once it is done: let that end run(), not Python
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    return 1 if state.load_error else 0


def _check_draft(model: str, config, draft: str, draft_tokens: int, adapters: dict) -> None:
    """--draft checked before the server starts: its tokens per step, then its config and tokenizer against
    the model's (gptlab.infer.speculative.check_draft)."""
    from gptlab.infer.speculative import check_draft_dir
    from gptlab.tokenizer import load_tokenizer

    check("draft_tokens", draft_tokens)
    if adapters:
        raise GptlabError("--draft cannot be combined with --lora: the draft proposes the base model's tokens, and "
                          "adapter requests would decode without it")
    check_draft_dir(draft, config, load_tokenizer(model))


def _adapters(specs: list[str], base: str) -> dict[str, str]:
    """--lora NAME=DIR ... as {name: dir}, each dir checked to be a PEFT LoRA adapter before the server starts."""
    from gptlab.formats.peft import read_adapter_config

    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise GptlabError(f"--lora takes NAME=DIR, got {spec!r}")
        if name == base or name in out:
            raise GptlabError(f"--lora {name}: the name is taken (by {'the base model' if name == base else 'another adapter'})")
        read_adapter_config(path)
        out[name] = path
    return out
