"""FastAPI example: a fake LLM provider behind TierRoutingMiddleware.

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

The answer is an OpenAI chat completion whose `model` is the model the middleware chose, with
`x-tier`, `x-tier-provider`, `x-tier-model` and `x-tier-attempts` response headers. The extra
`x_fake_provider` member shows what the endpoint received (after the rewrite) and the cost of the
call at the model's configured prices. The endpoint learns the choice from
`tier_middleware.current_selection()` (also in `request.state.tier_selection`).

Make a model fail, to watch the retry on another model of the tier (the endpoint raises
`HTTPException(status)` for it, which the middleware counts as a provider failure)::

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
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse

from tier_middleware import TierRoutingMiddleware, current_selection, metrics_app, status_app

try:
    from examples import fake_provider
except ImportError:  # run as a script: python examples/fastapi_app.py
    import fake_provider  # type: ignore[no-redef]

CONFIG = Path(__file__).with_name("tiers.toml")

app = FastAPI(title="tier-middleware FastAPI example")
app.add_middleware(TierRoutingMiddleware, config=CONFIG, routes=["/v1/chat/completions"])
app.add_route("/metrics", metrics_app())
app.add_route("/status", status_app())


@app.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request) -> dict[str, Any] | StreamingResponse:
    body = await request.json()
    # The middleware's choice; None on a plain `"model": "..."` call that named no tier.
    selection = current_selection()
    model = body.get("model") or "unknown"
    if model in fake_provider.FAILING:
        raise HTTPException(fake_provider.FAILING[model], f"fake provider: {model} is failing")
    reply = fake_provider.Reply(body, model)
    if reply.streamed:
        return StreamingResponse(reply.chunks(), media_type="text/event-stream")
    info = {}
    if selection is not None:
        info = {
            "tier": selection.tier,
            "provider": selection.provider,
            "cost_usd": reply.cost(selection.config),
        }
    return reply.completion(info)


@app.post("/admin/fail")
async def fail(request: Request) -> dict[str, Any]:
    return fake_provider.fail(await request.json())


@app.post("/admin/recover")
async def recover(request: Request) -> dict[str, Any]:
    return fake_provider.recover(await request.json() if await request.body() else {})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
