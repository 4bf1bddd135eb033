"""Starlette example: a chat endpoint behind TierRoutingMiddleware that calls its provider with the
OpenAI SDK through UpstreamTransport (upstream.py). The provider is a fake one this server also
serves, at /fake-provider (fake_provider.py), reached over HTTP like the real one.

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

The answer is the provider's OpenAI chat completion for the model the middleware chose, with
`x-tier`, `x-tier-provider`, `x-tier-model` and `x-tier-attempts` response headers. Its extra
`x_fake_provider` member shows what the provider received from the SDK.

Make a model fail at the provider, to watch the retry on another model of the tier (the
transport tells the middleware what the provider answered)::

    curl -s localhost:8000/admin/fail -d '{"model": "gpt-4o-mini", "status": 503}'
    curl -s localhost:8000/admin/recover -d '{}'          # every model answers again
    curl -s localhost:8000/admin/recover -d '{"model": "gpt-4o-mini"}'   # just that one

A failed model stays in the middleware's backoff (30 s by default, then one probe request) even
after /admin/recover. The /admin paths are not routed, so the middleware leaves them untouched.

The middleware's metrics and status page::

    curl -s localhost:8000/metrics        # Prometheus text format
    curl -s localhost:8000/status         # JSON: per-model probability and health
"""

from __future__ import annotations

import os
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route

from tier_middleware import TierRoutingMiddleware, metrics_app, status_app

try:
    from examples import fake_provider, upstream
except ImportError:  # run as a script: python examples/starlette_app.py
    import fake_provider  # type: ignore[no-redef]
    import upstream  # type: ignore[no-redef]

CONFIG = Path(__file__).with_name("tiers.toml")


async def chat_completions(request: Request) -> Response:
    body = await request.json()
    # The middleware chose the model (it is in body["model"]; the whole choice is in
    # request.state.tier_selection). Call the provider with it, through the OpenAI SDK.
    status, answer, headers = await upstream.ask(f"{request.base_url}fake-provider/v1", body)
    if status == 200 and not isinstance(answer, dict):
        return StreamingResponse(answer, headers=headers)
    return JSONResponse(answer, status, headers)


async def fail(request: Request) -> Response:
    return JSONResponse(fake_provider.fail(await request.json()))


async def recover(request: Request) -> Response:
    return JSONResponse(fake_provider.recover(await request.json() if await request.body() else {}))


app = Starlette(
    routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/admin/fail", fail, methods=["POST"]),
        Route("/admin/recover", recover, methods=["POST"]),
        Route("/metrics", metrics_app()),
        Route("/status", status_app()),
        Mount("/fake-provider", fake_provider.app),  # stands in for api.openai.com
    ]
)
app.add_middleware(TierRoutingMiddleware, config=CONFIG, routes=["/v1/chat/completions"])


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
