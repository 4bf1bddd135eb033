"""Starlette example: a fake LLM provider behind TierRoutingMiddleware.

Run it from the repository root (tiers.toml is found next to this file)::

    uvicorn examples.starlette_app:app          # or: python examples/starlette_app.py
                                                # (PORT=8001 python ... to change the port)

Ask for a tier instead of a model; the endpoint receives the chosen model::

    curl -si localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
        -d '{"tier": "simple", "messages": [{"role": "user", "content": "hi"}]}'
    # the same, with the header or the model prefix:
    #   -H 'x-tier: simple' -d '{"messages": [...]}'
    #   -d '{"model": "tier:simple", "messages": [...]}'
    # add "stream": true to the body for server-sent events (chat.completion.chunk, then [DONE])

The answer is an OpenAI chat completion whose `model` is the model the middleware chose, with
`x-tier`, `x-tier-provider`, `x-tier-model` and `x-tier-attempts` response headers. The extra
`x_fake_provider` member shows what the endpoint received (after the rewrite) and the cost of the
call at the model's configured prices.

Make a model fail, to watch the retry on another model of the tier::

    curl -s localhost:8000/admin/fail -d '{"model": "gpt-4o-mini", "status": 503}'
    curl -s localhost:8000/admin/recover -d '{}'          # every model answers again
    curl -s localhost:8000/admin/recover -d '{"model": "gpt-4o-mini"}'   # just that one

A failed model stays in the middleware's backoff (30 s by default, then one probe request) even
after /admin/recover. The /admin paths are not routed, so the middleware leaves them untouched.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tier_middleware import TierRoutingMiddleware

CONFIG = Path(__file__).with_name("tiers.toml")

# model -> HTTP status the fake provider answers with instead of a completion
FAILING: dict[str, int] = {}


def _words(text: Any) -> int:
    return len(text.split()) if isinstance(text, str) else 0


def _reply(body: dict[str, Any], model: str) -> tuple[str, dict[str, int]]:
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    asked = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
    text = f"Hello from {model}! You said: {asked if isinstance(asked, str) else '...'}"
    prompt = sum(_words(m.get("content")) for m in messages)
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": _words(text),
        "total_tokens": prompt + _words(text),
    }
    return text, usage


async def chat_completions(request: Request) -> Response:
    body = await request.json()
    # Set by the middleware when the request named a tier; absent on a plain `"model": "..."` call.
    selection = getattr(request.state, "tier_selection", None)
    model = body.get("model") or "unknown"
    status = FAILING.get(model)
    if status is not None:
        error = {"message": f"fake provider: {model} is failing", "type": "server_error"}
        return JSONResponse({"error": {**error, "param": None, "code": status}}, status)

    text, usage = _reply(body, model)
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(
            _chunks(ident, created, model, text, usage if include_usage else None),
            media_type="text/event-stream",
        )
    info: dict[str, Any] = {"received": body}
    if selection is not None:
        prices = selection.config
        info |= {
            "tier": selection.tier,
            "provider": selection.provider,
            "cost_usd": (
                usage["prompt_tokens"] * prices.input_price_per_million
                + usage["completion_tokens"] * prices.output_price_per_million
            )
            / 1_000_000,
        }
    return JSONResponse(
        {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
            "x_fake_provider": info,
        }
    )


async def _chunks(
    ident: str, created: int, model: str, text: str, usage: dict[str, int] | None
) -> AsyncIterator[str]:
    """The reply as OpenAI `chat.completion.chunk` events, one per word, then `[DONE]`."""

    def event(delta: dict[str, str] | None, finish: str | None = None, **extra: Any) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        chunk = {"id": ident, "object": "chat.completion.chunk", "created": created}
        return f"data: {json.dumps({**chunk, 'model': model, 'choices': choices, **extra})}\n\n"

    yield event({"role": "assistant", "content": ""})
    for i, word in enumerate(text.split(" ")):
        yield event({"content": word if i == 0 else " " + word})
    yield event({}, "stop")
    if usage is not None:  # only when asked for with "stream_options": {"include_usage": true}
        yield event(None, usage=usage)
    yield "data: [DONE]\n\n"


async def fail(request: Request) -> Response:
    """{"model": "gpt-4o-mini", "status": 503}: that model answers `status` from now on."""
    body = await request.json()
    FAILING[body["model"]] = int(body.get("status", 503))
    return JSONResponse({"failing": FAILING})


async def recover(request: Request) -> Response:
    """{"model": "..."} recovers one model, {} all of them."""
    body = await request.json() if await request.body() else {}
    if "model" in body:
        FAILING.pop(body["model"], None)
    else:
        FAILING.clear()
    return JSONResponse({"failing": FAILING})


app = Starlette(
    routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/admin/fail", fail, methods=["POST"]),
        Route("/admin/recover", recover, methods=["POST"]),
    ]
)
app.add_middleware(TierRoutingMiddleware, config=CONFIG, routes=["/v1/chat/completions"])


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
