"""attempt_timeout: a model that hangs is a model failure, its attempt is cancelled, and the
request is retried on another model while the client is still there.

The deadline is the event loop's own clock (asyncio.timeout), so these tests use short real
timeouts (0.2 s) and bound every wait; a FakeClock still drives the health backoff.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from _clock import FakeClock
from configs import real_names
from llm_provider import CHAT, FakeProvider, sdk_app
from tier_middleware import HealthConfig, HealthTracker, RetryConfig, TierRoutingMiddleware

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "hi"}]


class Hanging(FakeProvider):
    """A provider on which `gpt-4o-mini` never answers; records the calls it abandoned."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled = 0

    async def handler(self, request: httpx2.Request) -> httpx2.Response:
        if b'"gpt-4o-mini"' in request.content:
            self.hits.append("gpt-4o-mini")
            try:
                await asyncio.Event().wait()  # forever
            finally:
                self.cancelled += 1
        return await super().handler(request)


def stack(provider: FakeProvider, **options: Any) -> tuple[Any, HealthTracker]:
    health = HealthTracker(HealthConfig(), clock=FakeClock())
    app = sdk_app(
        "fastapi",
        provider,
        mapped=True,
        config=real_names(),
        health=health,
        rng=random.Random(1),
        retries=RetryConfig(attempt_timeout=0.2),
        **options,
    )
    return app, health


async def test_a_hanging_model_is_backed_off_and_the_client_gets_a_retried_answer() -> None:
    provider = Hanging()
    app, health = stack(provider)
    tasks_before = len(asyncio.all_tasks())
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://s") as c,
    ):
        took = []
        for n in range(10):
            began = time.perf_counter()
            with anyio.fail_after(5):
                body = {"tier": "simple", "messages": [{"role": "user", "content": f"q{n}"}]}
                response = await c.post(CHAT, json=body)
            took.append(time.perf_counter() - began)
            assert response.status_code == 200
            assert response.headers["x-tier-model"] == "gemini-2.0-flash"
    assert provider.hits.count("gpt-4o-mini") == 1  # then it was left alone
    assert provider.cancelled == 1  # the hung call was cancelled, not left running
    assert not health.is_available("openai", "gpt-4o-mini")
    assert max(took) < 2.0  # the one retried request waited about one timeout
    # No task left behind: the hung call's was cancelled, and the one watchdog of the
    # middleware (all attempts share it) ends with the lifespan.
    assert len(asyncio.all_tasks()) == tasks_before


async def test_when_the_only_model_hangs_the_client_gets_a_503() -> None:
    provider = Hanging()
    config = real_names()
    config["tiers"]["moderate"] = [
        {"provider": "openai", "model": "gpt-4o-mini", "relative_cost": 1}
    ]
    health = HealthTracker(HealthConfig(), clock=FakeClock())
    app = sdk_app(
        "starlette",
        provider,
        config=config,
        health=health,
        retries=RetryConfig(attempt_timeout=0.2),
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://s") as c:
        with anyio.fail_after(5):
            response = await c.post(CHAT, json={"tier": "moderate", "messages": MESSAGES})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "attempt_timeout"
    assert response.headers["retry-after"] == "1"
    assert response.headers["x-tier-model"] == "gpt-4o-mini"
    assert provider.cancelled == 1
    # No other model proved the request fine: evidence, not yet a backoff; no probe slot held.
    state = health.status("openai", "gpt-4o-mini")
    assert (state.state, state.unconfirmed_failures, state.probes_in_flight) == ("available", 1, 0)


async def test_a_stream_is_bounded_only_until_its_first_byte() -> None:
    async def slow_stream(request: Request) -> Response:
        async def events() -> AsyncIterator[bytes]:
            yield b"data: first\n\n"
            await asyncio.sleep(0.5)  # longer than the timeout, after the response started
            yield b"data: second\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(routes=[Route(CHAT, slow_stream, methods=["POST"])])
    app.add_middleware(
        TierRoutingMiddleware,
        config=real_names(),
        routes=[CHAT],
        retries=RetryConfig(attempt_timeout=0.2),
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://s") as c:
        with anyio.fail_after(5):
            response = await c.post(CHAT, json={"tier": "simple", "messages": MESSAGES})
    assert response.status_code == 200
    assert response.text == "data: first\n\ndata: second\n\n"


async def test_none_disables_the_timeout() -> None:
    async def slow(request: Request) -> Response:
        await asyncio.sleep(0.3)
        return Response(b"{}", media_type="application/json")

    app = Starlette(routes=[Route(CHAT, slow, methods=["POST"])])
    app.add_middleware(
        TierRoutingMiddleware,
        config=real_names(),
        routes=[CHAT],
        retries=RetryConfig(attempt_timeout=None),
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://s") as c:
        response = await c.post(CHAT, json={"tier": "simple", "messages": MESSAGES})
    assert (response.status_code, response.headers["x-tier-attempts"]) == (200, "1")


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "60", True])
def test_an_attempt_timeout_that_is_not_a_positive_number_is_refused(bad: Any) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    with pytest.raises((TypeError, ValueError), match="attempt_timeout"):
        TierRoutingMiddleware(app, config=real_names(), retries=RetryConfig(attempt_timeout=bad))


def test_the_watchdog_follows_the_event_loop_when_it_changes() -> None:
    """An app built once and driven from successive event loops (asyncio.run per request, as
    some test suites do): every loop gets its deadlines enforced, and no loop's are lost."""
    provider = Hanging()
    app, health = stack(provider)

    async def ask(n: int) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://s") as c:
            body = {"tier": "simple", "messages": [{"role": "user", "content": f"q{n}"}]}
            with anyio.fail_after(5):
                return await c.post(CHAT, json=body)

    for n in range(4):
        response = asyncio.run(ask(n))
        assert response.status_code == 200
        assert response.headers["x-tier-model"] == "gemini-2.0-flash"
    assert provider.cancelled == provider.hits.count("gpt-4o-mini") == 1
    assert not health.is_available("openai", "gpt-4o-mini")


def test_loops_in_two_threads_at_once_each_enforce_their_own_deadlines() -> None:
    """One app, driven from two threads with an event loop each, at the same time: each loop's
    hung calls are cancelled by that loop's own watchdog, and every request is served."""
    provider = Hanging()
    app, health = stack(provider)
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    async def client(thread: int) -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://s") as c:
            for n in range(6):
                body = {
                    "tier": "simple",
                    "messages": [{"role": "user", "content": f"{thread}-{n}"}],
                }
                with anyio.fail_after(5):
                    response = await c.post(CHAT, json=body)
                results.setdefault(thread, []).append(response.status_code)

    def run(thread: int) -> None:
        try:
            asyncio.run(client(thread))
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert results == {0: [200] * 6, 1: [200] * 6}
    assert provider.cancelled == provider.hits.count("gpt-4o-mini") >= 1
    assert not health.is_available("openai", "gpt-4o-mini")
