"""Apps whose tier config is what TIER_CONFIG says (a path, relative to the server's working
directory) or, with CONTROL_PLANE_URL, a control plane; started by tests/test_startup.py as
`uvicorn --factory config_apps:<framework>`. Each is built the way its users build it: Starlette
and FastAPI add the middleware (built lazily, inside the server's first call), Django wraps its
handler (built in the factory, which uvicorn calls in its event loop, as it imports an app under
--reload or --workers; config_django.py builds it at import instead)."""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tier_middleware import ControlPlaneSource, TierRoutingMiddleware

ROUTES = ["/v1/chat/completions"]
urlpatterns: list[Any] = []  # Django's ROOT_URLCONF: nothing but the middleware's answers


def options() -> dict[str, Any]:
    url = os.environ.get("CONTROL_PLANE_URL")
    config = ControlPlaneSource(url, timeout=0.5) if url else os.environ["TIER_CONFIG"]
    return {"config": config, "routes": ROUTES, "config_timeout": 1.0}


async def healthz(request: Any) -> PlainTextResponse:
    return PlainTextResponse("ok")


def starlette() -> Starlette:
    app = Starlette(routes=[Route("/healthz", healthz)])
    app.add_middleware(TierRoutingMiddleware, **options())
    return app


def fastapi() -> FastAPI:
    app = FastAPI()
    app.add_api_route("/healthz", healthz)
    app.add_middleware(TierRoutingMiddleware, **options())
    return app


def django() -> Any:
    from django.conf import settings
    from django.core.asgi import get_asgi_application

    settings.configure(SECRET_KEY="config-apps", ALLOWED_HOSTS=["127.0.0.1"], ROOT_URLCONF=__name__)
    return TierRoutingMiddleware(get_asgi_application(), **options())
