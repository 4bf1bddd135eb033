"""Sessions, shared health and config sources through the middleware, in memory and on Redis."""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from asgi_harness import Provider, call
from configs import two_per_tier
from control_plane import ControlPlane, tier_payload
from redis_server import BlackHole, RedisServer
from tier_middleware import ControlPlaneSource, HealthConfig, TierRoutingMiddleware

pytestmark = pytest.mark.anyio

ROUTE = "/v1/chat/completions"
CONFIG = two_per_tier()
PROVIDER_OF = {m["model"]: m["provider"] for ms in CONFIG["tiers"].values() for m in ms}


class Apps:
    """Middlewares built by a test, closed at its end."""

    def __init__(self) -> None:
        self.built: list[TierRoutingMiddleware] = []

    def __call__(self, **options: Any) -> tuple[TierRoutingMiddleware, Provider]:
        provider = options.pop("provider", None) or Provider()
        options.setdefault("config", CONFIG)
        options.setdefault("routes", [ROUTE])
        options.setdefault("rng", random.Random(len(self.built)))
        mw = TierRoutingMiddleware(provider, **options)
        self.built.append(mw)
        return mw, provider


@pytest.fixture
async def apps() -> AsyncIterator[Apps]:
    built = Apps()
    yield built
    for mw in built.built:
        await mw.aclose()


def chat(tier: str) -> bytes:
    return json.dumps({"tier": tier, "messages": [{"role": "user", "content": "hi"}]}).encode()


def headers(session: str | None = None, auth: str | None = None) -> list[tuple[str, str]]:
    out = [("content-type", "application/json")]
    if session is not None:
        out.append(("x-session-id", session))
    if auth is not None:
        out.append(("authorization", auth))
    return out


async def ask(mw: Any, tier: str, session: str | None = None, auth: str | None = None) -> Any:
    return await call(mw, chat(tier), headers=headers(session, auth))


# -- sticky sessions, one suite over both backends ---------------------------------------------------


async def test_a_session_keeps_its_model(apps: Apps, redis_url: str | None) -> None:
    for seed in range(3):
        mw, _ = apps(redis_url=redis_url, rng=random.Random(seed))
        first = (await ask(mw, "simple", session=f"conv-{seed}")).headers["x-tier-model"]
        models = {
            (await ask(mw, "simple", f"conv-{seed}")).headers["x-tier-model"] for _ in range(20)
        }
        assert models == {first}


async def test_tiers_go_up_never_down(apps: Apps, redis_url: str | None) -> None:
    mw, _ = apps(redis_url=redis_url)
    simple = await ask(mw, "simple", "conv")
    provider = simple.headers["x-tier-provider"]
    upgraded = await ask(mw, "complex", "conv")
    assert upgraded.headers["x-tier"] == "complex"
    assert upgraded.headers["x-tier-provider"] == provider  # the session's provider is preferred
    for tier in ("simple", "moderate", "complex"):
        again = await ask(mw, tier, "conv")
        assert again.headers["x-tier"] == "complex"
        assert again.headers["x-tier-model"] == upgraded.headers["x-tier-model"]


async def test_sessions_belong_to_their_caller(apps: Apps, redis_url: str | None) -> None:
    mw, _ = apps(redis_url=redis_url)
    await ask(mw, "simple", "shared-id", auth="Bearer alice")
    await ask(mw, "complex", "shared-id", auth="Bearer alice")
    # Bob guesses Alice's session id: he neither reads her complex session nor moves it.
    bob = await ask(mw, "simple", "shared-id", auth="Bearer bob")
    assert bob.headers["x-tier"] == "simple"
    alice = await ask(mw, "simple", "shared-id", auth="Bearer alice")
    assert alice.headers["x-tier"] == "complex"


@pytest.mark.parametrize(
    "session", ["", "x" * 129, "has space", "a/b", "line\nbreak", "caf\u00e9", "semi;colon"]
)
async def test_bad_session_ids_are_400_and_touch_no_store(
    apps: Apps, redis_url: str | None, session: str, request: pytest.FixtureRequest
) -> None:
    mw, provider = apps(redis_url=redis_url)
    raw = [("content-type", "application/json")]
    scope_headers = [(b"content-type", b"application/json"), (b"x-session-id", session.encode())]
    from asgi_harness import http_scope

    scope = http_scope(ROUTE, raw)
    scope["headers"] = scope_headers
    result = await call(mw, chat("simple"), scope=scope)
    assert result.status == 400
    assert result.json()["error"]["code"] == "invalid_session_id"
    assert provider.calls == []
    if redis_url is not None:
        server: RedisServer = request.getfixturevalue("redis_server")
        assert server.command("DBSIZE") == 0


async def test_a_session_moves_off_a_failing_model_and_stays_moved(
    apps: Apps, redis_url: str | None
) -> None:
    mw, provider = apps(redis_url=redis_url)
    first = (await ask(mw, "moderate", "conv")).headers["x-tier-model"]
    other = ({"4o", "sonnet"} - {first}).pop()
    provider.status[first] = 503
    moved = await ask(mw, "moderate", "conv")
    assert (moved.status, moved.headers["x-tier-model"]) == (200, other)
    provider.status.clear()  # even once the first model is healthy again, the session stays
    mw.health.record_success(PROVIDER_OF[first], first)
    for _ in range(5):
        assert (await ask(mw, "moderate", "conv")).headers["x-tier-model"] == other


# -- Redis specifics ---------------------------------------------------------------------------


# Commands the measuring client itself sends (a connection handshake and the INFO query).
_MEASURING = {"hello", "info", "client", "ping"}


def commands(server: RedisServer) -> dict[str, int]:
    stats = server.command("INFO", "commandstats")
    counts = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    return {name: n for name, n in counts.items() if name not in _MEASURING}


@pytest.mark.redis
async def test_two_instances_share_sessions(apps: Apps, redis_server: RedisServer) -> None:
    a, _ = apps(redis_url=redis_server.url, rng=random.Random(1))
    b, _ = apps(redis_url=redis_server.url, rng=random.Random(2))
    opened = await ask(a, "simple", "conv")
    for _ in range(10):
        assert (await ask(b, "simple", "conv")).headers["x-tier-model"] == opened.headers[
            "x-tier-model"
        ]
    upgraded = await ask(b, "complex", "conv")
    assert (await ask(a, "simple", "conv")).headers["x-tier-model"] == upgraded.headers[
        "x-tier-model"
    ]


@pytest.mark.redis
async def test_redis_round_trips_per_request(apps: Apps, redis_server: RedisServer) -> None:
    mw, _ = apps(redis_url=redis_server.url)
    await ask(mw, "simple", "warm")  # connect
    before = commands(redis_server)
    await ask(mw, "simple")  # no session, in-memory health: no Redis at all
    after_plain = commands(redis_server)
    assert after_plain == before
    await ask(mw, "simple", "new-conv")  # create: one read, one write
    await ask(mw, "simple", "new-conv")  # same tier: one read, no write
    await ask(mw, "complex", "new-conv")  # upgrade: one read, one write
    after = commands(redis_server)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert delta.get("getex") == 3
    assert delta.get("set") == 2
    assert sum(delta.values()) == 5
    ttl = redis_server.command("PTTL", next(iter(redis_server.command("KEYS", "*"))))
    assert 3_500_000 < ttl <= 3_600_000  # sliding TTL, default one hour


@pytest.mark.redis
async def test_shared_health_fleet_wide(apps: Apps, redis_server: RedisServer) -> None:
    options = {"redis_url": redis_server.url, "shared_health": True, "health_sync_interval": 0.0}
    a, provider_a = apps(**options)
    b, provider_b = apps(**options)
    provider_a.status["mini"] = 503
    for _ in range(10):  # until A has drawn the failing model once
        await ask(a, "simple")
        if "mini" in provider_a.models:
            break
    assert "mini" in provider_a.models
    for _ in range(10):  # B never sends it a request: it learned from A through Redis
        assert (await ask(b, "simple")).headers["x-tier-model"] == "haiku"
    assert "mini" not in provider_b.models
    assert not b.health.is_available("openai", "mini")


@pytest.mark.redis
async def test_exactly_one_instance_probes_a_recovering_model(
    apps: Apps, redis_server: RedisServer
) -> None:
    options = {
        "redis_url": redis_server.url,
        "shared_health": True,
        "health_sync_interval": 0.0,
        "health": HealthConfig(initial_backoff=0.0, max_backoff=0.0),
    }
    a, _ = apps(**options)
    b, _ = apps(**options)
    assert a.router is not None
    assert b.router is not None
    failing = await a.router.pin("moderate", "openai", "4o")
    assert failing is not None
    await a.state.failure(failing, None)
    await b.state.sync_health()
    # The backoff (0 s) is over: the model is half-open on both, and one of them takes the lease.
    claims = [await mw.router.pin("moderate", "openai", "4o") for mw in (a, b)]  # type: ignore[union-attr]
    assert sum(c is not None for c in claims) == 1
    # Once the probe reports success, the lease is free and both route to it again.
    winner = a if claims[0] is not None else b
    await winner.state.success(failing)
    await b.state.sync_health()
    await a.state.sync_health()
    assert all(mw.health.is_available("openai", "4o") for mw in (a, b))


@pytest.mark.redis
@pytest.mark.parametrize("fault", ["kill", "pause", "black_hole"])
async def test_redis_faults_never_fail_or_stall_a_request(
    apps: Apps, fresh_redis_server: RedisServer, fault: str
) -> None:
    hole = BlackHole() if fault == "black_hole" else None
    url = hole.url if hole is not None else fresh_redis_server.url
    mw, _ = apps(redis_url=url, shared_health=True)
    try:
        if fault == "kill":
            fresh_redis_server.kill()
        elif fault == "pause":
            fresh_redis_server.pause(3000)
        worst = 0.0
        for i in range(5):
            started = time.monotonic()
            result = await ask(mw, "simple", f"conv-{i}")
            worst = max(worst, time.monotonic() - started)
            assert result.status == 200
        assert worst < 0.5  # the 100 ms socket timeout, plus scheduling noise
        errors = mw.metrics.backend_errors.collect()[0].samples
        assert sum(s.value for s in errors if s.name.endswith("_total")) >= 1
    finally:
        if hole is not None:
            hole.close()


@pytest.mark.redis
async def test_back_on_redis_by_itself_after_a_restart(
    apps: Apps, fresh_redis_server: RedisServer
) -> None:
    mw, _ = apps(redis_url=fresh_redis_server.url)
    mw.state.cooldown = 0.0  # retry the backend on the very next request
    fresh_redis_server.kill()
    assert (await ask(mw, "simple", "during")).status == 200
    fresh_redis_server.start()
    assert (await ask(mw, "simple", "after")).status == 200
    keys = fresh_redis_server.command("KEYS", "*")
    assert any(k.endswith(b":after") or str(k).endswith(":after") for k in keys)


# -- config from a control plane -------------------------------------------------------------------


async def test_control_plane_config_is_fetched_once_and_served_from_memory(apps: Apps) -> None:
    async with ControlPlane() as plane:
        mw, _ = apps(config=ControlPlaneSource(plane.url), routes=[ROUTE])
        for _ in range(50):
            assert (await ask(mw, "simple")).status == 200
        assert plane.hits == 1


async def test_no_config_at_all_is_a_503_config_unavailable(apps: Apps) -> None:
    async with ControlPlane() as plane:
        plane.behaviour = "error500"
        mw, provider = apps(config=ControlPlaneSource(plane.url, timeout=0.5))
        result = await ask(mw, "simple")
        assert result.status == 503
        assert result.json()["error"]["code"] == "config_unavailable"
        assert 1 <= int(result.headers["retry-after"]) <= 60
        assert provider.calls == []


async def test_a_new_version_is_adopted_without_restart_keeping_health(apps: Apps) -> None:
    async with ControlPlane(tier_payload("1")) as plane:
        mw, _ = apps(config=ControlPlaneSource(plane.url))
        await ask(mw, "simple")
        mw.health.record_failure("openai", "gpt-4o")
        plane.serve("2", simple_model="gpt-4.1-mini")
        await mw.configs.refresh()
        assert mw.config is not None
        assert mw.config.version == "2"
        result = await ask(mw, "simple")
        assert result.headers["x-tier-model"] in {"gpt-4.1-mini", "gemini-flash"}
        assert not mw.health.is_available("openai", "gpt-4o")  # kept across the swap


async def test_fallback_config_serves_while_the_control_plane_is_down(apps: Apps) -> None:
    async with ControlPlane() as plane:
        plane.behaviour = "html"
        mw, _ = apps(config=ControlPlaneSource(plane.url), fallback=CONFIG)
        result = await ask(mw, "complex")
        assert result.status == 200
        assert result.headers["x-tier-model"] in {"o3", "opus"}


@pytest.mark.redis
async def test_a_fleet_asks_the_control_plane_once_per_ttl(
    apps: Apps, redis_server: RedisServer
) -> None:
    async with ControlPlane() as plane:
        fleet = [
            apps(config=ControlPlaneSource(plane.url), redis_url=redis_server.url)[0]
            for _ in range(3)
        ]
        for mw in fleet:
            assert (await ask(mw, "simple")).status == 200
        assert plane.hits == 1


@pytest.mark.redis
async def test_resources_open_lazily_and_close_at_lifespan_shutdown(
    redis_server: RedisServer,
) -> None:
    from asgi_lifespan import LifespanManager
    from starlette.applications import Starlette

    def clients() -> int:
        return int(redis_server.command("INFO", "clients")["connected_clients"])

    app = Starlette()
    app.add_middleware(
        TierRoutingMiddleware, config=CONFIG, routes=[ROUTE], redis_url=redis_server.url
    )
    baseline = clients()
    async with LifespanManager(app):
        assert clients() == baseline  # nothing opened before it is needed
        mw = app.middleware_stack
        while not isinstance(mw, TierRoutingMiddleware):
            mw = mw.app  # type: ignore[union-attr]
        await mw.state.save_session("k", _record())
        assert clients() == baseline + 1
    assert clients() == baseline  # closed when the app shut down


def _record() -> Any:
    from tier_middleware._stores import SessionRecord

    return SessionRecord("openai", "mini", "simple", 1.0, 1.0)
