"""One app, many event loops; and backends that raise what nobody expected.

A middleware is often built once and driven from several event loops: Starlette's TestClient
without a `with` block runs every request in a loop of its own, as do successive `asyncio.run()`
calls in a user's tests. The Redis store keeps one client per loop and closes each in its own
loop when that loop shuts down, so every request is served from Redis, none is a backend error,
and no connection or warning is left behind (pytest runs with `filterwarnings = error`, so an
unclosed socket or transport found by the garbage collector fails the test).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from asgi_harness import call
from configs import two_per_tier
from redis_server import RedisServer
from tier_middleware import RequestLimits, TierRoutingMiddleware
from tier_middleware._stores import MemoryStore, RedisStore, SessionRecord, StoreError

CHAT = "/v1/chat/completions"
JSON = ("content-type", "application/json")
BODY = b'{"tier": "simple", "messages": [{"role": "user", "content": "hi"}]}'
# Where a test counts backend errors to prove that a new loop is none: time enough that a pause
# of the loaded machine (a full collection of the suite's heap takes ~0.2 s) is not one either.
PATIENT = {"socket_timeout": 5.0, "connect_timeout": 5.0}


async def chat(request: Request) -> JSONResponse:
    return JSONResponse({"model": (await request.json())["model"]})


def errors(registry: CollectorRegistry) -> float:
    return sum(
        s.value
        for m in registry.collect()
        for s in m.samples
        if s.name == "llm_backend_errors_total"
    )


def connected(server: RedisServer) -> int:
    return int(server.command("INFO", "clients")["connected_clients"])


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    yield CollectorRegistry()
    gc.collect()  # an unclosed socket of a dead loop would warn here, and fail the test


def test_an_app_driven_by_a_test_client_without_with_answers_from_every_loop(
    redis_server: RedisServer, registry: CollectorRegistry
) -> None:
    app = Starlette(routes=[Route(CHAT, chat, methods=["POST"])])
    app.add_middleware(
        TierRoutingMiddleware,
        config=two_per_tier(),
        routes=[CHAT],
        redis_url=redis_server.url,
        redis_options=PATIENT,
        shared_health=True,
        health_sync_interval=0.0,  # every request reads fleet health: the store on every loop
        registry=registry,
    )
    baseline = connected(redis_server)
    client = TestClient(app)  # no `with`: each request runs in a new event loop, then it closes
    models: dict[str, set[str]] = {"a": set(), "b": set()}
    statuses = []
    for i in range(8):
        session = "ab"[i % 2]
        headers = {"x-session-id": session, "content-type": "application/json"}
        response = client.post(CHAT, content=BODY, headers=headers)
        statuses.append(response.status_code)
        if response.status_code == 200:
            models[session].add(response.json()["model"])
    assert statuses == [200] * 8
    assert all(len(seen) == 1 for seen in models.values()), models  # sticky across loops
    assert errors(registry) == 0  # a new loop is no backend failure: Redis served every request
    assert len(redis_server.command("KEYS", "tier:s:*")) == 2
    # Each finished loop closed its client: at most the last loop's connection is left open.
    assert connected(redis_server) <= baseline + 1


def test_an_app_built_once_answers_from_four_successive_asyncio_runs(
    redis_server: RedisServer, registry: CollectorRegistry
) -> None:
    mw = TierRoutingMiddleware(
        Starlette(routes=[Route(CHAT, chat, methods=["POST"])]),
        config=two_per_tier(),
        routes=[CHAT],
        redis_url=redis_server.url,
        redis_options=PATIENT,
        shared_health=True,
        health_sync_interval=0.0,
        registry=registry,
    )
    baseline = connected(redis_server)
    results: list[tuple[int, str]] = []

    async def two_requests() -> None:
        for session in ("a", "b"):
            result = await call(mw, BODY, headers=[JSON, ("x-session-id", session)])
            results.append((result.status, result.headers.get("x-tier-model", "")))

    for _ in range(4):
        asyncio.run(two_requests())
    assert [status for status, _ in results] == [200] * 8
    assert len({model for (_, model) in results[0::2]}) == 1  # session a: one model throughout
    assert len({model for (_, model) in results[1::2]}) == 1
    assert errors(registry) == 0
    assert connected(redis_server) == baseline  # every loop's client closed with its loop

    async def close() -> None:
        await mw.aclose()

    asyncio.run(close())


def test_aclose_closes_this_loops_client_and_the_store_opens_another_when_used_again(
    redis_server: RedisServer,
) -> None:
    store = RedisStore(redis_server.url)
    record = SessionRecord("openai", "mini", "simple", 1.0, 1.0)
    baseline = connected(redis_server)

    async def use_and_close() -> SessionRecord | None:
        await store.put_session("k", record, 60.0)
        got = await store.get_session("k", 60.0)
        assert connected(redis_server) == baseline + 1
        await store.aclose()
        assert connected(redis_server) == baseline
        return got

    assert asyncio.run(use_and_close()) == record
    assert asyncio.run(store.get_session("k", 60.0)) == record  # a new client, closed with its loop
    assert connected(redis_server) == baseline


# A loop closed by hand, without finalizing its async generators, cannot run the close of its
# client any more: its sockets are left to the garbage collector, which warns (the README says
# so). What must hold is that nothing fails and nothing calls into the dead loop.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_loop_closed_by_hand_leaves_its_client_behind_and_nothing_fails(
    redis_server: RedisServer,
) -> None:
    store = RedisStore(redis_server.url)
    record = SessionRecord("openai", "mini", "simple", 1.0, 1.0)
    by_hand = asyncio.new_event_loop()
    by_hand.run_until_complete(store.put_session("k", record, 60.0))
    by_hand.close()

    async def next_loop() -> SessionRecord | None:
        got = await store.get_session("k", 60.0)  # a new client; the dead loop's is let go
        await store.aclose()
        return got

    assert asyncio.run(next_loop()) == record
    gc.collect()


# -- any exception of a backend is a backend failure ----------------------------------------------


class Raising(MemoryStore):
    """A backend whose every call raises something else each time: nothing a Redis client
    would, nothing a StoreError."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: Iterator[Callable[[], Exception]] = iter(
            [RuntimeError, KeyError, AttributeError, ValueError, TypeError, AssertionError] * 100
        )
        self.calls = 0

    def fail(self) -> None:
        self.calls += 1
        raise next(self.kinds)()

    async def get_session(self, key: str, ttl: float) -> SessionRecord | None:
        self.fail()
        return None

    async def put_session(self, key: str, record: SessionRecord, ttl: float) -> None:
        self.fail()

    async def get_session_and_health(self, key: str, ttl: float) -> Any:
        self.fail()

    async def health_snapshot(self) -> Any:
        self.fail()

    async def record_failure(self, *args: Any, **kwargs: Any) -> tuple[int, float]:
        self.fail()
        return 0, 0.0

    async def try_probe(self, provider: str, model: str, ttl: float) -> bool:
        self.fail()
        return True


@pytest.mark.anyio
async def test_any_exception_from_a_backend_is_a_backend_failure_and_never_a_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    mw = TierRoutingMiddleware(
        Starlette(routes=[Route(CHAT, chat, methods=["POST"])]),
        config=two_per_tier(),
        routes=[CHAT],
        redis_url="redis://127.0.0.1:1/0",  # never used: the store is replaced below
        shared_health=True,
        health_sync_interval=0.0,
        registry=registry,
    )
    broken = Raising()
    mw.state.store = broken
    mw.state.cooldown = 0.0  # ask the broken backend on every request
    caplog.set_level(logging.INFO, logger="tier_middleware")
    statuses = []
    for i in range(12):
        result = await call(mw, BODY, headers=[JSON, ("x-session-id", f"s{i % 3}")])
        statuses.append(result.status)
    assert statuses == [200] * 12
    assert broken.calls >= 12  # every request met a failing backend ...
    assert errors(registry) == broken.calls  # ... and each failure was counted
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "state backend failing; using in-process state"
    ]  # once for the whole streak


@pytest.mark.anyio
async def test_the_redis_store_turns_any_exception_into_a_store_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever redis-py raises (here from its client's own commands), not only its errors."""
    store = RedisStore("redis://127.0.0.1:1/0")
    try:
        for kind in (RuntimeError, KeyError, AttributeError):

            async def broken(*args: Any, kind: type[Exception] = kind, **kwargs: Any) -> Any:
                raise kind("attached to a different loop")

            monkeypatch.setattr(Redis, "getex", broken)
            monkeypatch.setattr(Redis, "ping", broken)
            with pytest.raises(StoreError) as caught:
                await store.get_session("k", 60.0)
            assert type(caught.value.__cause__) is kind
            assert await store.ping() is False
    finally:
        await store.aclose()


# -- successive loops while Redis fails ------------------------------------------------------------


def allow_all_but_complex_for_strangers(scope: Any, tier: str) -> bool:
    """A sync authorize (run in a worker thread): everyone may use simple and moderate."""
    return tier != "complex"


@pytest.mark.faults
@pytest.mark.parametrize("fault", ["kill", "pause", "black_hole"])
def test_successive_event_loops_under_load_while_redis_fails_fail_and_hang_nothing(
    fresh_redis_server: RedisServer, black_hole: Any, fault: str
) -> None:
    """Four `asyncio.run()` loops of 150 session requests each (concurrency 16) through one app
    with shared health, a sync `authorize` and `body_timeout`: Redis fails during the second
    loop (killed, paused 3 s) or never answers (a black hole), and comes back by the fourth.
    Every request is a 200 within its deadline, and every session keeps its model throughout."""
    server = fresh_redis_server
    registry = CollectorRegistry()
    mw = TierRoutingMiddleware(
        Starlette(routes=[Route(CHAT, chat, methods=["POST"])]),
        config=two_per_tier(),
        routes=[CHAT],
        redis_url=black_hole.url if fault == "black_hole" else server.url,
        shared_health=True,
        authorize=allow_all_but_complex_for_strangers,
        limits=RequestLimits(body_timeout=5.0),
        registry=registry,
    )
    models: dict[str, set[str]] = {}

    async def one_loop(number: int) -> None:
        async def one(i: int) -> None:
            session = f"s{i % 50}"
            tier = ("simple", "moderate")[i // 75]
            body = json.dumps({"tier": tier, "messages": []}).encode()
            result = await call(mw, body, headers=[JSON, ("x-session-id", session)])
            assert result.status == 200, (number, result.status, result.body)
            if i >= 75:  # every session is at moderate from here on
                models.setdefault(session, set()).add(result.headers["x-tier-model"])
            if number == 1 and i == 20:
                if fault == "kill":
                    server.kill()
                elif fault == "pause":
                    server.pause(3_000)

        queue = iter(range(150))

        async def worker() -> None:
            for i in queue:
                await one(i)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(16):
                    tg.start_soon(worker)

    async def back_on_redis() -> None:
        """Once Redis answers and the 1 s cooldown is over (real time: both are), the sessions
        are in Redis again, with the models they had, the killed server's written back."""
        with anyio.fail_after(15):
            while len(server.command("KEYS", "tier:s:anon:s*")) < 50:
                for k in range(50):
                    headers = [JSON, ("x-session-id", f"s{k}")]
                    result = await call(mw, BODY, headers=headers)
                    assert result.status == 200
                    models[f"s{k}"].add(result.headers["x-tier-model"])
                await anyio.sleep(0.1)  # polling interval

    for number in range(4):
        if number == 3 and fault == "kill":
            server.start()
        asyncio.run(one_loop(number))
    assert errors(registry) >= 1  # the fault was met, in one loop or several
    if fault != "black_hole":
        asyncio.run(back_on_redis())
    assert len(models) == 50
    assert all(len(seen) == 1 for seen in models.values()), models

    async def close() -> None:
        await mw.aclose()

    asyncio.run(close())
