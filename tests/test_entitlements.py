"""Entitlements: which caller may use which tier (`authorize=`, sync or async) and what a route
allows (`RoutePolicy(allowed_tiers=...)`), with sessions that raise a request's tier."""

from __future__ import annotations

import functools
import json
import threading
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI, Request

from asgi_harness import Provider, call
from configs import one_per_tier
from tier_middleware import RoutePolicy, TierConfig, TierRoutingMiddleware

pytestmark = pytest.mark.anyio

CONFIG = TierConfig.load(one_per_tier())
# The documented recipe: each API key has a highest tier it may use.
HIGHEST = {"sk-basic": "simple", "sk-team": "moderate", "sk-pro": "complex"}


def api_key(scope: Any) -> str:
    for name, value in scope["headers"]:
        if name == b"authorization":
            return str(value.decode().removeprefix("Bearer "))
    return ""


def up_to_highest(scope: Any, tier: str) -> bool:
    highest = HIGHEST.get(api_key(scope))
    return highest is not None and CONFIG.rank(tier) <= CONFIG.rank(highest)


async def async_up_to_highest(scope: Any, tier: str) -> bool:
    return up_to_highest(scope, tier)


def request(tier: str, key: str, session: str | None = None) -> dict[str, Any]:
    headers = [("content-type", "application/json"), ("authorization", f"Bearer {key}")]
    if session:
        headers.append(("x-session-id", session))
    return {"body": json.dumps({"tier": tier}).encode(), "headers": headers}


@pytest.mark.parametrize("authorize", [up_to_highest, async_up_to_highest])
async def test_callers_reach_their_tiers_and_no_higher(authorize: Any) -> None:
    provider = Provider()
    mw = TierRoutingMiddleware(provider, config=CONFIG, routes=["/chat"], authorize=authorize)
    ok = await call(mw, path="/chat", **request("moderate", "sk-team"))
    denied = await call(mw, path="/chat", **request("complex", "sk-team"))
    stranger = await call(mw, path="/chat", **request("simple", "sk-unknown"))
    assert ok.status == 200
    for result in (denied, stranger):
        assert result.status == 403
        assert result.json()["error"]["code"] == "tier_not_allowed"
    assert provider.models == ["4o"]


async def test_a_session_cannot_carry_a_caller_above_their_entitlement() -> None:
    allowed = {"complex"}

    def authorize(scope: Any, tier: str) -> bool:
        return tier in allowed or tier == "simple"

    provider = Provider()
    mw = TierRoutingMiddleware(provider, config=CONFIG, routes=["/chat"], authorize=authorize)
    assert (await call(mw, path="/chat", **request("complex", "k", "conv"))).status == 200
    allowed.clear()  # the caller's plan changed; the session is still at complex
    result = await call(mw, path="/chat", **request("simple", "k", "conv"))
    assert result.status == 403
    assert provider.models == ["opus"]


# -- a session never carries a request past what its route allows ------------------------------

ROUTES = {
    "/chat": RoutePolicy(),
    "/basic": RoutePolicy(allowed_tiers=["simple"]),
    "/team": RoutePolicy(allowed_tiers=["simple", "moderate"]),
}


def fastapi_app(**options: Any) -> tuple[FastAPI, list[str]]:
    """A real FastAPI app behind the middleware; returns it and the models it was called with."""
    called: list[str] = []
    app = FastAPI()

    async def chat(request: Request) -> dict[str, str]:
        model = str((await request.json())["model"])
        called.append(model)
        return {"model": model}

    for path in ROUTES:
        app.add_api_route(path, chat, methods=["POST"])
    app.add_middleware(TierRoutingMiddleware, config=CONFIG, routes=ROUTES, **options)
    return app, called


async def test_a_session_cannot_carry_a_request_past_the_routes_allowed_tiers(
    redis_url: str | None,
) -> None:
    app, called = fastapi_app(redis_url=redis_url)
    session = {"x-session-id": "conv", "authorization": "Bearer k"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        opened = await client.post("/chat", json={"tier": "complex"}, headers=session)
        assert (opened.status_code, opened.headers["x-tier"]) == (200, "complex")
        model = opened.headers["x-tier-model"]

        # The route allows only simple; the session would raise the request to complex.
        refused = await client.post("/basic", json={"tier": "simple"}, headers=session)
        assert refused.status_code == 403
        assert refused.json()["error"] == {
            "message": "this session is at tier 'complex', which is not allowed on this route; "
            "allowed: simple",
            "type": "invalid_request_error",
            "param": "tier",
            "code": "tier_not_allowed",
        }
        for _ in range(2):  # the session is left as it is: still complex, still the same model
            again = await client.post("/chat", json={"tier": "simple"}, headers=session)
            assert (again.status_code, again.headers["x-tier"]) == (200, "complex")
            assert again.headers["x-tier-model"] == model
        # Without the session, the same request is simple, and allowed.
        plain = await client.post("/basic", json={"tier": "simple"})
        assert (plain.status_code, plain.headers["x-tier"]) == (200, "simple")
    assert called == [model, model, model, "mini"]  # /basic never reached the app with a session


async def test_a_session_inside_the_routes_allowed_tiers_raises_the_request() -> None:
    app, called = fastapi_app()
    session = {"x-session-id": "conv"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.post("/chat", json={"tier": "moderate"}, headers=session)).is_success
        raised = await client.post("/team", json={"tier": "simple"}, headers=session)
        assert (raised.status_code, raised.headers["x-tier"]) == (200, "moderate")
    assert called == ["4o", "4o"]


async def test_the_raised_tier_is_authorized_like_a_requested_one() -> None:
    asked: list[str] = []

    def authorize(scope: Any, tier: str) -> bool:
        asked.append(tier)
        return tier != "complex" or api_key(scope) == "sk-pro"

    app, called = fastapi_app(authorize=authorize)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        pro = {"x-session-id": "conv", "authorization": "Bearer sk-pro"}
        assert (await client.post("/chat", json={"tier": "complex"}, headers=pro)).is_success
        # Another caller's session with the same id is another session: theirs starts simple.
        basic = {"x-session-id": "conv", "authorization": "Bearer sk-basic"}
        assert (await client.post("/chat", json={"tier": "simple"}, headers=basic)).is_success
    assert asked == ["complex", "simple"]
    assert called == ["opus", "mini"]


# -- a sync authorize runs off the event loop -----------------------------------------------------


async def test_a_sync_authorize_runs_in_a_worker_thread_and_never_blocks_the_loop() -> None:
    """One caller's authorize blocks (a slow database); another caller is served meanwhile.
    Were authorize called on the event loop, the second request could not even start."""
    loop_thread = threading.get_ident()
    threads: list[int] = []
    release = threading.Event()

    def authorize(scope: Any, tier: str) -> bool:
        threads.append(threading.get_ident())
        if api_key(scope) == "sk-slow":
            release.wait(timeout=5)
        return True

    provider = Provider()
    mw = TierRoutingMiddleware(provider, config=CONFIG, routes=["/chat"], authorize=authorize)
    results: dict[str, int] = {}

    async def slow() -> None:
        results["slow"] = (await call(mw, path="/chat", **request("simple", "sk-slow"))).status

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(slow)
            fast = await call(mw, path="/chat", **request("moderate", "sk-fast"))
            results["fast"] = fast.status
            assert "slow" not in results  # still inside its authorize
            release.set()
    assert results == {"fast": 200, "slow": 200}
    assert provider.models == ["4o", "mini"]
    assert len(threads) == 2
    assert loop_thread not in threads


authorized_on: list[int] = []  # where each async authorize below ran


async def recorded(scope: Any, tier: str) -> bool:
    authorized_on.append(threading.get_ident())
    return up_to_highest(scope, tier)


class AsyncAuthorizer:
    async def __call__(self, scope: Any, tier: str) -> bool:
        return await recorded(scope, tier)


@pytest.mark.parametrize(
    "authorize",
    [recorded, functools.partial(recorded), AsyncAuthorizer()],
    ids=["async def", "partial of async def", "async __call__"],
)
async def test_an_async_authorize_runs_on_the_event_loop(authorize: Any) -> None:
    authorized_on.clear()
    mw = TierRoutingMiddleware(Provider(), config=CONFIG, routes=["/chat"], authorize=authorize)
    ok = await call(mw, path="/chat", **request("complex", "sk-pro"))
    denied = await call(mw, path="/chat", **request("complex", "sk-team"))
    assert (ok.status, denied.status) == (200, 403)
    loop_thread = threading.get_ident()
    assert authorized_on == [loop_thread, loop_thread]
