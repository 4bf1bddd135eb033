"""One instance of a fleet: a fake LLM provider behind TierRoutingMiddleware, configured by env.

Run it under a real server, one process per instance:

    python -m uvicorn fleet_app:app --app-dir tests --port 8001

Environment (read once, at import):

    REDIS_URL             sessions (and, with SHARED_HEALTH, health) on this Redis; unset: memory
    SHARED_HEALTH         "1" to share provider health through Redis
    HEALTH_SYNC_INTERVAL  seconds between two reads of the fleet's health (default 1.0)
    HEALTH_BACKOFF        initial backoff in seconds after a failure (default 30)
    CONTROL_PLANE_URL     fetch the tier config from this URL (a ControlPlaneSource) ...
    CONFIG_TTL            ... with this TTL in seconds (default 1800)
    INSTANCE              a name for this instance, echoed in every answer (default "fleet")

Without CONTROL_PLANE_URL the built-in `CONFIG` is used: three tiers of two models each, one per
provider, at equal cost (so either model of a tier is drawn about half the time).

Endpoints:

    POST /v1/chat/completions   routed by the middleware; the provider echoes the model it got
    POST /admin/fail            {"model": M}: this instance's provider answers 503 for M from now
    POST /admin/heal            {"model": M} (or {} for all): M answers 200 again
    GET  /admin/state           {"instance", "calls": [models in call order], "failing": [...],
                                 "config_version", "unavailable": [[provider, model], ...]}
    POST /admin/reset           forget the recorded calls
    GET  /healthz               "ok" (not routed: it never triggers a config fetch)
"""

from __future__ import annotations

import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from configs import two_per_tier
from tier_middleware import ControlPlaneSource, HealthConfig, TierRoutingMiddleware

CHAT_PATH = "/v1/chat/completions"
CONFIG = two_per_tier("static-1")

INSTANCE = os.environ.get("INSTANCE", "fleet")
calls: list[str] = []  # the model of every call the provider received, in order
failing: set[str] = set()


async def chat(request: Request) -> JSONResponse:
    body = await request.json()
    model = str(body.get("model", ""))
    calls.append(model)
    headers = {"x-provider-instance": INSTANCE}
    if model in failing:
        return JSONResponse(
            {"error": {"message": f"{model} is overloaded", "type": "overloaded"}},
            status_code=503,
            headers=headers,
        )
    return JSONResponse(
        {
            "object": "chat.completion",
            "model": model,
            "instance": INSTANCE,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
        },
        headers=headers,
    )


async def admin_fail(request: Request) -> JSONResponse:
    failing.add(str((await request.json())["model"]))
    return JSONResponse({"failing": sorted(failing)})


async def admin_heal(request: Request) -> JSONResponse:
    model = (await request.json()).get("model")
    if model is None:
        failing.clear()
    else:
        failing.discard(str(model))
    return JSONResponse({"failing": sorted(failing)})


async def admin_reset(request: Request) -> JSONResponse:
    calls.clear()
    return JSONResponse({"calls": calls})


async def admin_state(request: Request) -> JSONResponse:
    config = app.config
    unavailable = []
    if config is not None:
        for models in config.tiers.values():
            for m in models:
                if not app.health.is_available(m.provider, m.model):
                    unavailable.append([m.provider, m.model])
    return JSONResponse(
        {
            "instance": INSTANCE,
            "calls": calls,
            "failing": sorted(failing),
            "config_version": config.version if config is not None else None,
            "unavailable": unavailable,
        }
    )


async def healthz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def build() -> TierRoutingMiddleware:
    provider = Starlette(
        routes=[
            Route(CHAT_PATH, chat, methods=["POST"]),
            Route("/admin/fail", admin_fail, methods=["POST"]),
            Route("/admin/heal", admin_heal, methods=["POST"]),
            Route("/admin/reset", admin_reset, methods=["POST"]),
            Route("/admin/state", admin_state, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )
    plane = os.environ.get("CONTROL_PLANE_URL")
    config: Any = (
        ControlPlaneSource(plane, ttl=float(os.environ.get("CONFIG_TTL", "1800")))
        if plane
        else CONFIG
    )
    return TierRoutingMiddleware(
        provider,
        config=config,
        routes=[CHAT_PATH],
        redis_url=os.environ.get("REDIS_URL") or None,
        shared_health=_flag("SHARED_HEALTH"),
        health_sync_interval=float(os.environ.get("HEALTH_SYNC_INTERVAL", "1.0")),
        health=HealthConfig(initial_backoff=float(os.environ.get("HEALTH_BACKOFF", "30"))),
        name=INSTANCE,
    )


app = build()
