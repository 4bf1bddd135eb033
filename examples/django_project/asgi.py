"""Django example: the whole project behind TierRoutingMiddleware.

Run it from the repository root (tiers.toml is found next to the examples)::

    uvicorn examples.django_project.asgi:application

Django's ASGI handler does not speak the lifespan protocol; with uvicorn's default
`--lifespan auto` that only logs "ASGI 'lifespan' protocol appears unsupported." (pass
`--lifespan off` to silence it). The middleware hands lifespan events to Django unchanged.

Requests and the fail switch are the same as in the Starlette example; see views.py.
Django's URLconf routes to views, not to ASGI apps, so the middleware's metrics and status page
are dispatched here, by path, with or without a trailing slash::

    curl -s localhost:8000/metrics        # Prometheus text format
    curl -s localhost:8000/status         # JSON: per-model probability and health
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from django.core.asgi import get_asgi_application

from tier_middleware import TierRoutingMiddleware, metrics_app, status_app

from .. import fake_provider

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_project.settings")

CONFIG = Path(__file__).resolve().parent.parent / "tiers.toml"
ROUTES = ["/v1/chat/completions"]  # the paths whose requests are routed by tier

django_app = TierRoutingMiddleware(get_asgi_application(), config=CONFIG, routes=ROUTES)
endpoints = {"/metrics": metrics_app(), "/status": status_app()}


async def application(scope: Any, receive: Any, send: Any) -> None:
    endpoint = endpoints.get(scope["path"].rstrip("/")) if scope["type"] == "http" else None
    if scope["type"] == "http" and scope["path"].startswith("/fake-provider/"):
        endpoint = fake_provider.app  # stands in for api.openai.com
    await (endpoint or django_app)(scope, receive, send)
