"""FastAPI example: a chat endpoint behind TierRoutingMiddleware that calls its provider with the
OpenAI SDK through UpstreamTransport (upstream.py). The provider is a fake one this server also
serves, at /fake-provider (fake_provider.py), reached over HTTP like the real one.

Run it from the repository root (tiers.toml is found next to this file)::

    uvicorn examples.fastapi_app:app            # or: python examples/fastapi_app.py
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
`x_fake_provider` member shows what the provider received from the SDK, and `x_tier` what the
endpoint learnt from `tier_middleware.current_selection()` (also `request.state.tier_selection`).

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
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tier_middleware import TierRoutingMiddleware, current_selection, metrics_app, status_app

try:
    from examples import fake_provider, upstream
except ImportError:  # run as a script: python examples/fastapi_app.py
    import fake_provider  # type: ignore[no-redef]
    import upstream  # type: ignore[no-redef]

CONFIG = Path(__file__).with_name("tiers.toml")

app = FastAPI(title="tier-middleware FastAPI example")
app.add_middleware(TierRoutingMiddleware, config=CONFIG, routes=["/v1/chat/completions"])
app.add_route("/metrics", metrics_app())
app.add_route("/status", status_app())
app.mount("/fake-provider", fake_provider.app)  # stands in for api.openai.com


@app.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request) -> Response:
    body = await request.json()
    # The middleware's choice (None on a plain `"model": "..."` call that named no tier); the
    # chosen model is in body["model"]. Call the provider with it, through the OpenAI SDK.
    selection = current_selection()
    status, answer, headers = await upstream.ask(f"{request.base_url}fake-provider/v1", body)
    if status == 200 and not isinstance(answer, dict):
        return StreamingResponse(answer, headers=headers)
    if selection is not None and status == 200:
        answer["x_tier"] = {"tier": selection.tier, "provider": selection.provider}
    return JSONResponse(answer, status, headers)


@app.post("/admin/fail")
async def fail(request: Request) -> dict[str, Any]:
    return fake_provider.fail(await request.json())


@app.post("/admin/recover")
async def recover(request: Request) -> dict[str, Any]:
    return fake_provider.recover(await request.json() if await request.body() else {})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
