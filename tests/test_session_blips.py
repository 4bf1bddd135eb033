"""Sessions across a Redis blip: two instances in one process, one real redis-server.

Each instance keeps a bounded local copy of the sessions it read from or wrote to Redis, so a
session it has served keeps its model while Redis cannot be reached. When Redis answers again its
record wins over one the instance made up during the outage, except that a session upgraded to a
higher tier during the outage stays upgraded and is written back.

The outage is a network partition (tests/redis_server.py's `Partition`: bytes are swallowed, so
Redis keeps exactly what it had) or a killed server (everything lost). Every model in a tier has
the same weight, so a session that lost its record draws its old model only half the time: 40
sessions keeping theirs by chance has a probability of 2**-40.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from _clock import FakeClock
from asgi_harness import Provider, call
from configs import two_per_tier
from redis_server import Partition, RedisServer
from tier_middleware import TierRoutingMiddleware
from tier_middleware._stores import SessionRecord

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

ROUTE = "/v1/chat/completions"
SESSIONS = [f"conv-{i}" for i in range(40)]


def chat(tier: str) -> bytes:
    return json.dumps({"tier": tier, "messages": [{"role": "user", "content": "hi"}]}).encode()


async def ask(mw: TierRoutingMiddleware, session: str, tier: str = "simple") -> tuple[str, str]:
    """(tier, model) that served the request; it must be a 200."""
    headers = [("content-type", "application/json"), ("x-session-id", session)]
    result = await call(mw, chat(tier), headers=headers)
    assert result.status == 200, (result.status, result.body)
    return result.headers["x-tier"], result.headers["x-tier-model"]


def errors(mw: TierRoutingMiddleware) -> float:
    samples = mw.metrics.backend_errors.collect()[0].samples
    return sum(s.value for s in samples if s.name.endswith("_total"))


def stored(server: RedisServer, session: str) -> SessionRecord | None:
    raw = server.command("GET", f"tier:s:anon:{session}")
    return None if raw is None else SessionRecord.loads(raw)


class Instances:
    """Middlewares on one Redis, their state backend's cooldown on one clock the test moves."""

    def __init__(self) -> None:
        self.built: list[TierRoutingMiddleware] = []
        self.clock = FakeClock()

    def instance(self, url: str, **options: Any) -> TierRoutingMiddleware:
        mw = TierRoutingMiddleware(
            Provider(),
            config=two_per_tier(),
            routes=[ROUTE],
            redis_url=url,
            registry=CollectorRegistry(),
            rng=random.Random(len(self.built)),
            # Longer than a pause of the loaded machine (a full collection of the suite's heap
            # takes ~0.2 s), so that only the partition makes a backend error, as counted here.
            redis_options={"socket_timeout": 0.5, "connect_timeout": 0.5},
            **options,
        )
        mw.state.clock = self.clock  # the 1 s cooldown after a Redis error: on a clock we move
        self.built.append(mw)
        return mw

    def redis_back(self) -> None:
        """Redis answers again: let the instances' cooldown run out."""
        self.clock.advance(60.0)


@pytest.fixture
async def fleet() -> AsyncIterator[Instances]:
    built = Instances()
    yield built
    for mw in built.built:
        await mw.aclose()


@pytest.fixture
async def partition(fresh_redis_server: RedisServer) -> AsyncIterator[Partition]:
    relay = Partition(fresh_redis_server.port)
    await relay.start()
    yield relay
    await relay.close()


@pytest.mark.parametrize("shared_health", [False, True])
async def test_a_session_an_instance_served_keeps_its_model_while_redis_is_unreachable(
    fleet: Instances, partition: Partition, shared_health: bool
) -> None:
    a = fleet.instance(partition.url, shared_health=shared_health)
    b = fleet.instance(partition.url, shared_health=shared_health)
    opened = {s: await ask(a, s) for s in SESSIONS}  # opened on A, written to Redis
    for s in SESSIONS:
        assert await ask(b, s) == opened[s]  # B read each from Redis once
    assert errors(a) == errors(b) == 0
    partition.cut = True
    for mw in (a, b):
        assert {s: await ask(mw, s) for s in SESSIONS} == opened
        assert errors(mw) >= 1  # the outage was met (then the cooldown kept Redis out)
    partition.heal()
    fleet.redis_back()
    met = [errors(a), errors(b)]
    for mw in (a, b):
        assert {s: await ask(mw, s) for s in SESSIONS} == opened
    assert [errors(a), errors(b)] == met  # served from Redis again


async def test_after_the_outage_redis_wins_over_a_session_made_up_locally(
    fresh_redis_server: RedisServer, fleet: Instances, partition: Partition
) -> None:
    a = fleet.instance(partition.url)
    b = fleet.instance(partition.url)
    opened = {s: await ask(a, s) for s in SESSIONS}
    partition.cut = True
    # B never saw these sessions: during the outage it opens each anew, locally.
    during = {s: await ask(b, s) for s in SESSIONS}
    assert during != opened  # about half drew the other model (all agreeing: p = 2**-40)
    partition.heal()
    fleet.redis_back()
    assert {s: await ask(b, s) for s in SESSIONS} == opened  # Redis's record won
    assert {s: await ask(a, s) for s in SESSIONS} == opened
    assert {s: (r.tier, r.model) for s in SESSIONS if (r := stored(fresh_redis_server, s))} == (
        opened
    )
    assert b.state.written_locally == ()  # every local record was reconciled, none is left


async def test_a_session_upgraded_during_the_outage_keeps_the_upgrade_and_redis_learns_it(
    fresh_redis_server: RedisServer, fleet: Instances, partition: Partition
) -> None:
    a = fleet.instance(partition.url)
    b = fleet.instance(partition.url)
    for s in SESSIONS:
        await ask(a, s)
    partition.cut = True
    upgraded = {s: await ask(b, s, "complex") for s in SESSIONS}
    assert all(tier == "complex" for tier, _ in upgraded.values())
    partition.heal()
    fleet.redis_back()
    # Back on Redis, B keeps the upgrade (a tier never goes down) and writes it back ...
    assert {s: await ask(b, s, "simple") for s in SESSIONS} == upgraded
    assert {s: (r.tier, r.model) for s in SESSIONS if (r := stored(fresh_redis_server, s))} == (
        upgraded
    )
    # ... so A, which still holds the simple record in its copy, is served the upgrade too.
    assert {s: await ask(a, s, "simple") for s in SESSIONS} == upgraded


async def test_sessions_survive_a_redis_that_lost_everything(
    fresh_redis_server: RedisServer, fleet: Instances
) -> None:
    a = fleet.instance(fresh_redis_server.url, shared_health=True)
    opened = {s: await ask(a, s) for s in SESSIONS}
    fresh_redis_server.kill()
    assert {s: await ask(a, s) for s in SESSIONS} == opened
    fresh_redis_server.start()  # empty: nothing was persisted
    fleet.redis_back()
    assert {s: await ask(a, s) for s in SESSIONS} == opened
    # Each was written back from the local copy: a new instance finds them in Redis.
    fresh = fleet.instance(fresh_redis_server.url)
    assert {s: await ask(fresh, s) for s in SESSIONS} == opened
