"""The same behaviour cases over real Starlette, FastAPI and Django apps behind the middleware.

Each app plays a provider on POST /v1/chat/completions (opted in) that answers with what it
received: the raw body, the x-tier-* request headers, the selection in the ASGI scope state and
`current_selection()`. The module-level FAIL table makes a model fail: a status to answer with,
"raise" for an exception before the response starts, or "http_exception" for the framework's
HTTPException(503). POST /echo is not opted in and answers the same way.

Starlette and FastAPI endpoints read the selection from `request.state.tier_selection`, Django
views from `request.scope["state"]`; all three also read `current_selection()` and the headers.

Model choice is made deterministic with an rng that always draws the first healthy model of a
tier (config order), and time only moves through a FakeClock given to the HealthTracker.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from fastapi import FastAPI
from fastapi import HTTPException as FastAPIHTTPException
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from _clock import FakeClock
from configs import entry, real_names
from tier_middleware import (
    HealthConfig,
    HealthTracker,
    Selection,
    TierRoutingMiddleware,
    current_selection,
)

ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]

CHAT = "/v1/chat/completions"
ECHO = "/echo"  # not opted in: the middleware must leave it alone

# Moderate has one model: whether it is backed off is visible in whether requests still reach it.
CONFIG = real_names(more={"complex": [entry("openai", "o3", 30)]})
FIRST_SIMPLE = {"tier": "simple", "provider": "openai", "model": "gpt-4o-mini"}
SECOND_SIMPLE = {"tier": "simple", "provider": "google", "model": "gemini-2.0-flash"}
MESSAGES = [{"role": "user", "content": "Say hi"}]
TIER_HEADERS = ("x-tier", "x-tier-provider", "x-tier-model")

# model -> how the provider fails for it: an HTTP status, "raise" or "http_exception"
FAIL: dict[str, int | str] = {}
# x-tier-model of every call that reached a chat endpoint, in order
CALLS: list[str | None] = []


class ProviderCrash(RuntimeError):
    """Raised by an endpoint before it starts its response."""


class FirstChoice(random.Random):
    """Always draws the first healthy model of a tier, in config order."""

    def random(self) -> float:
        return 0.0


@pytest.fixture(autouse=True)
def _reset_provider() -> None:
    FAIL.clear()
    CALLS.clear()


def _selection(selection: Selection | None) -> dict[str, str] | None:
    if selection is None:
        return None
    return {"tier": selection.tier, "provider": selection.provider, "model": selection.model}


def echo(raw: bytes, headers: Mapping[str, str], state: Mapping[str, Any]) -> dict[str, Any]:
    """What the app received; `state` is what the endpoint found in its request state."""
    return {
        "raw": raw.decode(),
        "content_length": headers.get("content-length"),
        "headers": {name: headers.get(name) for name in TIER_HEADERS},
        "state_selection": _selection(state.get("tier_selection")),
        "current_selection": _selection(current_selection()),
        "greeting": state.get("greeting"),  # lifespan state, for an app with a lifespan
    }


def provider(
    raw: bytes,
    headers: Mapping[str, str],
    state: Mapping[str, Any],
    http_exception: type[Exception] | None = None,
) -> tuple[int, dict[str, Any]]:
    """The fake provider shared by all three frameworks: (status, JSON answer)."""
    model = headers.get("x-tier-model")
    CALLS.append(model)
    action = FAIL.get(model or "")
    if action == "raise":
        raise ProviderCrash(f"{model} crashed")
    if action == "http_exception":
        assert http_exception is not None, "this framework has no HTTPException"
        raise http_exception(503, f"{model} is overloaded")
    if isinstance(action, int):
        return action, {"error": {"message": f"{model} is failing", "code": action}}
    return 200, echo(raw, headers, state)


# -- the three apps ---------------------------------------------------------------------------


def starlette_state(request: Request) -> dict[str, Any]:
    return {
        "tier_selection": getattr(request.state, "tier_selection", None),
        "greeting": getattr(request.state, "greeting", None),
    }


async def starlette_chat(request: Request) -> Response:
    body, state = await request.body(), starlette_state(request)
    status, answer = provider(body, request.headers, state, StarletteHTTPException)
    return JSONResponse(answer, status)


async def starlette_echo(request: Request) -> Response:
    return JSONResponse(echo(await request.body(), request.headers, starlette_state(request)))


@asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
    yield {"greeting": "hello"}


def make_starlette(with_lifespan: bool = False) -> Starlette:
    return Starlette(
        routes=[
            Route(CHAT, starlette_chat, methods=["POST"]),
            Route(ECHO, starlette_echo, methods=["POST"]),
        ],
        lifespan=lifespan if with_lifespan else None,
    )


def make_fastapi(with_lifespan: bool = False) -> FastAPI:
    app = FastAPI(lifespan=lifespan if with_lifespan else None)

    @app.post(CHAT)
    async def chat(request: Request) -> Response:
        body, state = await request.body(), starlette_state(request)
        status, answer = provider(body, request.headers, state, FastAPIHTTPException)
        return JSONResponse(answer, status)

    @app.post(ECHO)
    async def echo_view(request: Request) -> Response:
        return JSONResponse(echo(await request.body(), request.headers, starlette_state(request)))

    return app


def django_state(request: HttpRequest) -> dict[str, Any]:
    scope = request.scope  # Django ASGIRequest: the scope the middleware passed
    return dict(scope.get("state") or {})


async def django_chat(request: HttpRequest) -> HttpResponse:
    status, answer = provider(request.body, request.headers, django_state(request))
    return JsonResponse(answer, status=status)


async def django_echo(request: HttpRequest) -> HttpResponse:
    return JsonResponse(echo(request.body, request.headers, django_state(request)))


# ROOT_URLCONF is this module.
urlpatterns = [path(CHAT.lstrip("/"), django_chat), path(ECHO.lstrip("/"), django_echo)]


def make_django() -> ASGIApp:
    """Django's ASGI handler for this module's urls. Settings can be configured once per process,
    so the first call configures them and later calls reuse that configuration."""
    from django.conf import settings
    from django.core.asgi import get_asgi_application

    if not settings.configured:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="test-frameworks",
            ALLOWED_HOSTS=["testserver"],
            ROOT_URLCONF=__name__,
            INSTALLED_APPS=[],
            MIDDLEWARE=[],
            DATABASES={},
            USE_TZ=True,
        )
    elif __name__ != settings.ROOT_URLCONF:
        pytest.fail(
            f"Django was already configured elsewhere (ROOT_URLCONF={settings.ROOT_URLCONF})"
        )
    app: ASGIApp = get_asgi_application()
    return app


@dataclass
class Harness:
    framework: str
    client: httpx.AsyncClient
    health: HealthTracker
    clock: FakeClock

    async def chat(
        self, json_body: Any, headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        return await self.client.post(CHAT, json=json_body, headers=headers)


def build(framework: str, health: HealthTracker, *, with_lifespan: bool = False) -> ASGIApp:
    """The framework's app behind the middleware, added the way its users would add it."""
    options: dict[str, Any] = {
        "config": CONFIG,
        "routes": [CHAT],
        "health": health,
        "rng": FirstChoice(),
    }
    if framework == "django":
        return TierRoutingMiddleware(make_django(), **options)
    app = make_starlette(with_lifespan) if framework == "starlette" else make_fastapi(with_lifespan)
    app.add_middleware(TierRoutingMiddleware, **options)
    return app


@pytest.fixture(params=["starlette", "fastapi", "django"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    clock = FakeClock()
    health = HealthTracker(HealthConfig(initial_backoff=30.0), clock=clock)
    app = build(request.param, health)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield Harness(request.param, client, health, clock)


def tier_headers(response: httpx.Response) -> dict[str, str | None]:
    return {name: response.headers.get(name) for name in (*TIER_HEADERS, "x-tier-attempts")}


def received(response: httpx.Response) -> Any:
    """The JSON body the app received."""
    return json.loads(response.json()["raw"])


# -- naming a tier ----------------------------------------------------------------------------

TIER_REQUESTS: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
    "body field": ({}, {"tier": "simple", "messages": MESSAGES, "temperature": 0.2}),
    "header": ({"X-Tier": " Simple "}, {"messages": MESSAGES, "temperature": 0.2}),
    "model prefix": ({}, {"model": "tier:simple", "messages": MESSAGES, "temperature": 0.2}),
}


@pytest.mark.anyio
@pytest.mark.parametrize("how", TIER_REQUESTS)
async def test_tier_request_is_rewritten_to_the_chosen_model(harness: Harness, how: str) -> None:
    headers, body = TIER_REQUESTS[how]
    response = await harness.chat(body, headers)

    assert response.status_code == 200
    # The exact JSON the app got: `model` is the choice, the tier field is gone, the rest intact.
    assert received(response) == {
        "messages": MESSAGES,
        "temperature": 0.2,
        "model": "gpt-4o-mini",
    }
    answer = response.json()
    assert int(answer["content_length"]) == len(answer["raw"].encode())
    assert CALLS == ["gpt-4o-mini"]


@pytest.mark.anyio
@pytest.mark.parametrize("how", TIER_REQUESTS)
async def test_app_sees_the_choice(harness: Harness, how: str) -> None:
    headers, body = TIER_REQUESTS[how]
    answer = (await harness.chat(body, headers)).json()

    assert answer["headers"] == {
        "x-tier": "simple",  # normalised, and the client's own header replaced
        "x-tier-provider": "openai",
        "x-tier-model": "gpt-4o-mini",
    }
    assert answer["state_selection"] == FIRST_SIMPLE
    assert answer["current_selection"] == FIRST_SIMPLE
    assert current_selection() is None  # only set while the app handles the request


@pytest.mark.anyio
async def test_client_cannot_forge_the_selection_headers(harness: Harness) -> None:
    forged = {"x-tier-provider": "forged", "x-tier-model": "forged"}
    answer = (await harness.chat({"tier": "simple", "messages": MESSAGES}, forged)).json()

    # Only the middleware's values: not the client's, and not both (Django would join them).
    assert answer["headers"] == {
        "x-tier": "simple",
        "x-tier-provider": "openai",
        "x-tier-model": "gpt-4o-mini",
    }
    assert CALLS == ["gpt-4o-mini"]


@pytest.mark.anyio
@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
async def test_lifespan_state_reaches_the_app_and_is_not_polluted(framework: str) -> None:
    # asgi-lifespan, like servers, hands every request the same lifespan state dict.
    app = build(framework, HealthTracker(clock=FakeClock()), with_lifespan=True)
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://testserver"
        ) as client,
    ):
        routed = (await client.post(CHAT, json={"tier": "simple"})).json()
        assert routed["greeting"] == "hello"
        assert routed["state_selection"] == FIRST_SIMPLE

        # The selection was put in a copy of the state, not in the shared lifespan state.
        unrouted = (await client.post(ECHO, json={})).json()
        assert unrouted["greeting"] == "hello"
        assert unrouted["state_selection"] is None


@pytest.mark.anyio
async def test_response_carries_tier_headers(harness: Harness) -> None:
    response = await harness.chat({"model": "tier:complex", "messages": MESSAGES})

    assert response.status_code == 200
    assert tier_headers(response) == {
        "x-tier": "complex",
        "x-tier-provider": "anthropic",
        "x-tier-model": "claude-opus-4",
        "x-tier-attempts": "1",
    }
    assert received(response)["model"] == "claude-opus-4"


@pytest.mark.anyio
async def test_unknown_tier_is_rejected_with_the_valid_tiers(harness: Harness) -> None:
    response = await harness.chat({"tier": "expert", "messages": MESSAGES})

    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "message": "unknown tier 'expert'; valid tiers: simple, moderate, complex",
            "type": "invalid_request_error",
            "param": "tier",
            "code": "invalid_tier",
        }
    }
    assert CALLS == []


@pytest.mark.anyio
async def test_path_not_opted_in_passes_through_untouched(harness: Harness) -> None:
    raw = b'{"tier": "simple", "model": "tier:complex", "messages": []}'
    response = await harness.client.post(
        ECHO, content=raw, headers={"content-type": "application/json", "x-tier": "complex"}
    )

    assert response.status_code == 200
    answer = response.json()
    assert answer["raw"] == raw.decode()  # byte for byte, tier field and all
    assert answer["content_length"] == str(len(raw))
    assert answer["headers"] == {"x-tier": "complex", "x-tier-provider": None, "x-tier-model": None}
    assert answer["state_selection"] is None
    assert answer["current_selection"] is None
    assert tier_headers(response) == dict.fromkeys((*TIER_HEADERS, "x-tier-attempts"))


# -- failures and retries ---------------------------------------------------------------------


async def assert_retried_on_second_model(harness: Harness) -> None:
    """The first simple model fails: one retry on the other, which then serves alone."""
    response = await harness.chat({"tier": "simple", "messages": MESSAGES})

    assert response.status_code == 200
    assert CALLS == ["gpt-4o-mini", "gemini-2.0-flash"]
    assert tier_headers(response) == {
        "x-tier": "simple",
        "x-tier-provider": "google",
        "x-tier-model": "gemini-2.0-flash",
        "x-tier-attempts": "2",
    }
    answer = response.json()
    # The retry carries the body rewritten for the second model, and the app sees that choice.
    assert received(response) == {"messages": MESSAGES, "model": "gemini-2.0-flash"}
    assert answer["state_selection"] == SECOND_SIMPLE
    assert answer["current_selection"] == SECOND_SIMPLE
    assert harness.health.status("openai", "gpt-4o-mini").state == "backoff"

    # The failed model is skipped from now on (the rng would pick it first if it could).
    for _ in range(3):
        later = await harness.chat({"tier": "simple", "messages": MESSAGES})
        assert later.status_code == 200
        assert later.headers["x-tier-model"] == "gemini-2.0-flash"
        assert later.headers["x-tier-attempts"] == "1"
    assert CALLS == ["gpt-4o-mini"] + ["gemini-2.0-flash"] * 4


@pytest.mark.anyio
async def test_failure_status_is_retried_once_on_another_model(harness: Harness) -> None:
    FAIL["gpt-4o-mini"] = 503
    await assert_retried_on_second_model(harness)


@pytest.mark.anyio
async def test_unhandled_exception_is_retried_on_another_model(harness: Harness) -> None:
    # Starlette and FastAPI let the exception reach the middleware; Django turns it into a 500.
    FAIL["gpt-4o-mini"] = "raise"
    await assert_retried_on_second_model(harness)


@pytest.mark.anyio
@pytest.mark.parametrize("harness", ["starlette", "fastapi"], indirect=True)
async def test_http_exception_is_retried_on_another_model(harness: Harness) -> None:
    FAIL["gpt-4o-mini"] = "http_exception"
    await assert_retried_on_second_model(harness)


@pytest.mark.anyio
async def test_last_failure_reaches_the_client_when_every_model_fails(harness: Harness) -> None:
    FAIL["gpt-4o-mini"] = 503
    FAIL["gemini-2.0-flash"] = 502
    response = await harness.chat({"tier": "simple", "messages": MESSAGES})

    assert CALLS == ["gpt-4o-mini", "gemini-2.0-flash"]  # exactly one retry
    assert response.status_code == 502
    assert response.json() == {"error": {"message": "gemini-2.0-flash is failing", "code": 502}}
    assert tier_headers(response) == {
        "x-tier": "simple",
        "x-tier-provider": "google",
        "x-tier-model": "gemini-2.0-flash",
        "x-tier-attempts": "2",
    }

    # The request never got past its failures: evidence against both models, not proof.
    assert harness.health.status("openai", "gpt-4o-mini").state == "available"
    assert harness.health.status("openai", "gpt-4o-mini").unconfirmed_failures == 1
    # Sent again (a client's retry), the same body is a suspect: one attempt, counted nowhere.
    again = await harness.chat({"tier": "simple", "messages": MESSAGES})
    assert again.status_code == 503
    assert again.headers["x-tier-attempts"] == "1"
    assert harness.health.status("openai", "gpt-4o-mini").unconfirmed_failures == 1
    # Failures of three distinct requests agree: both models are backed off.
    for n in (2, 3):
        response = await harness.chat(
            {"tier": "simple", "messages": [{"role": "user", "content": f"{n}"}]}
        )
        assert response.status_code == 502
    assert len(CALLS) == 7

    # The middleware now answers without calling the app.
    response = await harness.chat({"tier": "simple", "messages": MESSAGES})
    assert response.status_code == 503
    assert response.json() == {
        "error": {
            "message": "all models for tier 'simple' are temporarily unavailable",
            "type": "service_unavailable",
            "param": None,
            "code": "service_unavailable",
        }
    }
    assert response.headers["retry-after"] == "30"
    assert response.headers["retry-after-ms"] == "30000"
    assert response.headers["x-tier-attempts"] == "0"
    assert len(CALLS) == 7

    # When the backoff ends and the provider is back, a probe gets through.
    FAIL.clear()
    harness.clock.advance(30.0)
    response = await harness.chat({"tier": "simple", "messages": MESSAGES})
    assert response.status_code == 200
    assert response.headers["x-tier-model"] == "gpt-4o-mini"
    assert harness.health.status("openai", "gpt-4o-mini").state == "available"


@pytest.mark.anyio
async def test_client_error_from_the_app_does_not_back_off_the_model(harness: Harness) -> None:
    FAIL["gpt-4o"] = 400
    for _ in range(2):
        response = await harness.chat({"tier": "moderate", "messages": MESSAGES})
        assert response.status_code == 400
        assert response.json() == {"error": {"message": "gpt-4o is failing", "code": 400}}
        assert response.headers["x-tier-model"] == "gpt-4o"
        assert response.headers["x-tier-attempts"] == "1"  # a 400 is not retried
    assert CALLS == ["gpt-4o", "gpt-4o"]  # the only model still gets requests
    assert harness.health.status("openai", "gpt-4o").state == "available"


@pytest.mark.anyio
async def test_failure_of_the_only_model_backs_it_off(harness: Harness) -> None:
    # The counterpart of the 400 case: 503s do take the single model out of rotation, once
    # failures of three distinct requests agree (with no other model, none is proof alone).
    FAIL["gpt-4o"] = 503
    for n in range(3):
        body = {"tier": "moderate", "messages": [{"role": "user", "content": f"{n}"}]}
        first = await harness.chat(body)
        assert first.status_code == 503
        assert first.json() == {"error": {"message": "gpt-4o is failing", "code": 503}}
        assert first.headers["x-tier-attempts"] == "1"  # no other model to retry on

    second = await harness.chat({"tier": "moderate", "messages": MESSAGES})
    assert second.status_code == 503
    assert second.json()["error"]["code"] == "service_unavailable"
    assert CALLS == ["gpt-4o"] * 3
