"""The state backends: one behaviour suite run against MemoryStore and a real redis-server.

Nothing here sleeps. Memory time moves through an injected FakeClock; Redis TTLs are read back
with PTTL (a TTL of 2.5 s must read 2.4-2.5 s, so milliseconds and refreshes are both checked).
Failure tests measure a bound with time.monotonic(), never wait for one.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from _clock import FakeClock
from redis_server import BlackHole, RedisServer
from servers import free_port
from tier_middleware._health import HealthConfig, HealthTracker, backoff_step
from tier_middleware._stores import (
    MemoryStore,
    RedisStore,
    SessionRecord,
    Store,
    StoreError,
    store_from_url,
)

pytestmark = pytest.mark.anyio

Call = Callable[[], Awaitable[object]]

NOW = 1_700_000_000.123456  # a wall-clock time with a fraction that a 14-digit format would lose
REC = SessionRecord("openai", "gpt-4o-mini", "simple", NOW - 60.0, NOW)
# A generous bound for "fails fast": the store's timeouts are 0.1 s; redis-py's own retry
# defaults would take several seconds.
FAST = 1.0


@dataclass
class Backend:
    """A store plus a side door into its storage, to read TTLs and plant foreign values."""

    kind: str
    store: Store
    clock: FakeClock | None = None  # memory only
    server: RedisServer | None = None  # redis only

    def _memory(self) -> MemoryStore:
        assert isinstance(self.store, MemoryStore)
        assert self.clock is not None
        return self.store

    def _raw(self, *args: object) -> object:
        assert self.server is not None
        return self.server.command(*args)

    def session_ttl(self, key: str) -> float | None:
        """Seconds left before the session expires, None if there is none."""
        if self.kind == "memory":
            expires = self._memory().session_expiry(key)
            return None if expires is None else expires - self.clock()  # type: ignore[misc]
        return _pttl(self._raw("PTTL", f"tier:s:{key}"))

    def lock_ttl(self, name: str) -> float | None:
        if self.kind == "memory":
            expires = self._memory().lock_expiry(name)
            return None if expires is None else expires - self.clock()  # type: ignore[misc]
        return _pttl(self._raw("PTTL", f"tier:lock:{name}"))

    def probe_ttl(self, provider: str, model: str) -> float | None:
        if self.kind == "memory":
            expires = self._memory().probe_expiry(provider, model)
            return None if expires is None else expires - self.clock()  # type: ignore[misc]
        return _pttl(self._raw("PTTL", f"tier:probe:{provider}\n{model}"))

    async def plant_session(self, key: str, value: bytes) -> None:
        """Store a value that is not a SessionRecord where the session would be."""
        if self.kind == "memory":
            await self._memory().put_session(key, value, 60.0)  # type: ignore[arg-type]
        else:
            self._raw("SET", f"tier:s:{key}", value, "PX", 60_000)

    def expire_lock(self, name: str) -> None:
        """What the TTL running out does (Redis deletes the key; memory sees the time pass)."""
        if self.kind == "memory":
            assert self.clock is not None
            self.clock.advance((self.lock_ttl(name) or 0.0) + 0.001)
        else:
            self._raw("DEL", f"tier:lock:{name}")

    def expire_probe(self, provider: str, model: str) -> None:
        if self.kind == "memory":
            assert self.clock is not None
            self.clock.advance((self.probe_ttl(provider, model) or 0.0) + 0.001)
        else:
            self._raw("DEL", f"tier:probe:{provider}\n{model}")


def _pttl(reply: object) -> float | None:
    assert isinstance(reply, int)
    return None if reply < 0 else reply / 1000.0


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        clock = FakeClock(NOW)
        yield Backend("memory", MemoryStore(clock=clock), clock=clock)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    async with aclosing(RedisStore(server.url)) as store:
        yield Backend("redis", store, server=server)


@pytest.fixture
async def redis_store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    async with aclosing(RedisStore(redis_server.url)) as store:
        yield store


# -- sessions (both backends) ----------------------------------------------------------------------


async def test_session_round_trip(backend: Backend) -> None:
    store = backend.store
    await store.put_session("owner:s1", REC, 60.0)
    assert await store.get_session("owner:s1", 60.0) == REC
    assert await store.get_session("owner:s2", 60.0) is None


async def test_put_replaces_a_session(backend: Backend) -> None:
    store = backend.store
    await store.put_session("k", REC, 60.0)
    upgraded = SessionRecord("anthropic", "claude", "complex", REC.created_at, NOW + 1)
    await store.put_session("k", upgraded, 60.0)
    assert await store.get_session("k", 60.0) == upgraded


async def test_missing_session_is_none(backend: Backend) -> None:
    assert await backend.store.get_session("never-written", 60.0) is None
    record, snapshot = await backend.store.get_session_and_health("never-written", 60.0)
    assert record is None
    assert snapshot == {}


async def test_put_sets_the_ttl_in_milliseconds_and_get_restarts_it(backend: Backend) -> None:
    store = backend.store
    await store.put_session("k", REC, 2.5)
    ttl = backend.session_ttl("k")
    assert ttl is not None
    assert 2.4 < ttl <= 2.5

    assert await store.get_session("k", 30.0) == REC
    ttl = backend.session_ttl("k")
    assert ttl is not None
    assert 29.9 < ttl <= 30.0

    assert await store.get_session_and_health("k", 45.0) == (REC, {})
    ttl = backend.session_ttl("k")
    assert ttl is not None
    assert 44.9 < ttl <= 45.0


@pytest.mark.parametrize(
    "garbage",
    [
        b"not json",
        b"\xff\xfe\x00",
        b"{}",
        b"[1, 2]",
        b'[1, "m", "t", 0, 0]',
        b'["p", "m", "t", "not a time", 0]',
        b"",
    ],
)
async def test_a_corrupt_session_reads_as_none(backend: Backend, garbage: bytes) -> None:
    await backend.plant_session("k", garbage)
    assert await backend.store.get_session("k", 60.0) is None
    assert (await backend.store.get_session_and_health("k", 60.0))[0] is None
    await backend.store.put_session("k", REC, 60.0)  # and it can be overwritten
    assert await backend.store.get_session("k", 60.0) == REC


async def test_get_session_and_health_returns_both(backend: Backend) -> None:
    store = backend.store
    cfg = HealthConfig(initial_backoff=10.0, max_backoff=100.0)
    await store.put_session("k", REC, 60.0)
    await store.record_failure("openai", "gpt-4o", cfg, None, NOW)
    await store.record_failure("openai", "gpt-4o", cfg, None, NOW)
    record, snapshot = await store.get_session_and_health("k", 60.0)
    assert record == REC
    assert snapshot == {("openai", "gpt-4o"): (2, NOW + 20.0)}
    assert snapshot == await store.health_snapshot()


# -- the config copy and the lock (both backends) ---------------------------------------------------


async def test_config_copy_round_trip(backend: Backend) -> None:
    store = backend.store
    assert await store.get_config() is None
    await store.put_config(b'{"tiers": {}}', NOW)
    assert await store.get_config() == (b'{"tiers": {}}', NOW)
    await store.put_config(b'{"tiers": {"a": 1}}', NOW + 30.5)
    assert await store.get_config() == (b'{"tiers": {"a": 1}}', NOW + 30.5)


async def test_locks_are_exclusive_until_unlocked_with_their_token(backend: Backend) -> None:
    store = backend.store
    token = await store.try_lock("config-refresh", 5.0)
    assert token
    ttl = backend.lock_ttl("config-refresh")
    assert ttl is not None
    assert 4.9 < ttl <= 5.0
    assert await store.try_lock("config-refresh", 5.0) is None
    assert await store.try_lock("other", 5.0) is not None  # locks are per name

    await store.unlock("config-refresh", "not-the-token")
    assert await store.try_lock("config-refresh", 5.0) is None  # still held

    await store.unlock("config-refresh", token)
    again = await store.try_lock("config-refresh", 5.0)
    assert again is not None
    assert again != token


async def test_an_expired_lock_is_taken_over_and_the_old_token_cannot_free_it(
    backend: Backend,
) -> None:
    store = backend.store
    first = await store.try_lock("job", 5.0)
    assert first is not None
    backend.expire_lock("job")
    second = await store.try_lock("job", 5.0)
    assert second is not None
    assert second != first
    await store.unlock("job", first)  # the first holder finishes late: a no-op
    assert await store.try_lock("job", 5.0) is None
    await store.unlock("job", second)
    assert await store.try_lock("job", 5.0) is not None


async def test_a_lock_is_held_longer_only_with_its_token_and_only_while_it_is_held(
    backend: Backend,
) -> None:
    store = backend.store
    token = await store.try_lock("config", 3.0)
    assert token is not None
    assert await store.hold_lock("config", "not-the-token", 27.0) is False
    ttl = backend.lock_ttl("config")
    assert ttl is not None
    assert 2.9 < ttl <= 3.0  # unchanged
    assert await store.hold_lock("config", token, 27.0) is True
    ttl = backend.lock_ttl("config")
    assert ttl is not None
    assert 26.9 < ttl <= 27.0  # from now, in milliseconds
    assert await store.try_lock("config", 3.0) is None
    backend.expire_lock("config")
    assert await store.hold_lock("config", token, 27.0) is False  # expired: nothing to hold
    assert (backend.lock_ttl("config") or 0.0) <= 0.0
    assert await store.try_lock("config", 3.0) is not None


# -- health (both backends) -------------------------------------------------------------------------

RETRY_AFTERS: list[float | None] = [
    None,
    None,
    None,
    0.5,
    45.0,
    5000.0,  # above the one-hour cap on Retry-After
    math.inf,  # ignored, like HealthTracker does
    math.nan,
    -3.0,
    0.0,
]

HEALTH_CONFIGS = {
    "threshold-1-cap": HealthConfig(initial_backoff=1.0, max_backoff=10.0, failure_threshold=1),
    "threshold-3-cap": HealthConfig(initial_backoff=1.0, max_backoff=10.0, failure_threshold=3),
    "fractional-jitter": HealthConfig(
        initial_backoff=0.3, max_backoff=1000.0, multiplier=1.5, jitter=0.25, failure_threshold=2
    ),
    "long-outage": HealthConfig(initial_backoff=30.0, max_backoff=300.0, multiplier=2.0),
}


@pytest.mark.parametrize("name", list(HEALTH_CONFIGS))
async def test_record_failure_computes_what_health_tracker_computes(
    backend: Backend, name: str
) -> None:
    """Same failures, Retry-Afters, jitter draws and times: the same counts and backoff ends,
    to the last bit (the Redis script does the arithmetic in Lua)."""
    cfg = HEALTH_CONFIGS[name]
    store = backend.store
    clock = FakeClock(NOW)  # HealthTracker's own clock; the store is told `now`
    tracker = HealthTracker(cfg, clock=clock, rng=random.Random(7))
    twin = random.Random(7)  # draws the same jitter the tracker draws
    script = random.Random(name)
    failures = 0
    for step in range(80):
        if step % 23 == 22:  # a success now and then starts the count again
            tracker.record_success("p", "m")
            await store.record_success("p", "m")
            failures = 0
        retry_after = script.choice(RETRY_AFTERS)
        backs_off = failures + 1 >= cfg.failure_threshold
        factor = 1.0 + cfg.jitter * (2.0 * twin.random() - 1.0) if cfg.jitter and backs_off else 1.0

        expected = tracker.record_failure("p", "m", retry_after)
        got = await store.record_failure("p", "m", cfg, retry_after, clock.now, factor)
        failures += 1

        assert got[0] == failures == tracker.status("p", "m").consecutive_failures
        if expected is None:
            assert not backs_off
            assert got == (failures, 0.0)
        else:
            assert got == (failures, clock.now + expected), (step, retry_after)
        assert (await store.health_snapshot())[("p", "m")] == got
        clock.advance(script.choice([0.0, 0.25, 3.0, 61.7]))


async def test_failures_in_flight_when_the_backoff_began_are_one_step(backend: Backend) -> None:
    """Several instances failing at once on one model: one step, whoever reports first."""
    cfg = HealthConfig(initial_backoff=1.0, max_backoff=100.0)
    store = backend.store
    began = NOW - 0.5  # the burst's requests all began before the first failure came back
    assert await store.record_failure("p", "m", cfg, None, NOW, started=began) == (1, NOW + 1.0)
    for k in range(1, 29):  # the same burst, reported by other instances
        got = await store.record_failure("p", "m", cfg, None, NOW + k / 100, started=began)
        assert got == (1, NOW + 1.0)
    # An in-flight 429's Retry-After lengthens the backoff, without a step.
    got = await store.record_failure("p", "m", cfg, 30.0, NOW + 0.3, started=began)
    assert got == (1, NOW + 0.3 + 30.0)
    # The probe after the backoff fails: the next step of the episode.
    got = await store.record_failure("p", "m", cfg, None, NOW + 31.0, started=NOW + 30.5)
    assert got == (2, NOW + 31.0 + 2.0)
    assert (await store.health_snapshot())[("p", "m")] == got


@pytest.mark.parametrize("name", list(HEALTH_CONFIGS))
async def test_in_flight_rule_is_the_python_rule_to_the_last_bit(
    backend: Backend, name: str
) -> None:
    """Failures whose attempts began at random times, before or after the current backoff did:
    the store computes exactly what `backoff_step` (the rule HealthTracker applies) computes."""
    cfg = HEALTH_CONFIGS[name]
    store = backend.store
    script = random.Random(f"in-flight-{name}")
    now = NOW
    failures, until, since = 0, 0.0, 0.0
    for step in range(120):
        if step % 37 == 36:
            await store.record_success("p", "m")
            failures, until, since = 0, 0.0, 0.0
        retry_after = script.choice(RETRY_AFTERS)
        began = now - script.choice([0.0, 0.1, 2.0, 30.0, 400.0])
        factor = 1.0 + cfg.jitter * (2.0 * script.random() - 1.0)
        failures, until, since, _ = backoff_step(
            failures, until, since, cfg, retry_after, now, began, factor
        )
        got = await store.record_failure("p", "m", cfg, retry_after, now, factor, started=began)
        assert got == (failures, until), step
        now += script.choice([0.0, 0.25, 3.0, 61.7])


async def test_backoff_exponent_stops_at_64_like_health_tracker(backend: Backend) -> None:
    cfg = HealthConfig(initial_backoff=1.0, max_backoff=1e30, multiplier=2.0)
    clock = FakeClock(NOW)
    tracker = HealthTracker(cfg, clock=clock)
    for _ in range(70):
        expected = tracker.record_failure("p", "m")
        assert expected is not None
        got = await backend.store.record_failure("p", "m", cfg, None, NOW)
        assert got[1] == NOW + expected
    assert got == (70, NOW + 2.0**64)  # not 2 ** 69, and below max_backoff


async def test_backoff_exponent_is_capped_so_a_long_outage_cannot_overflow(
    backend: Backend,
) -> None:
    cfg = HealthConfig(initial_backoff=1.0, max_backoff=1e300, multiplier=1e10)
    for _ in range(70):
        failures, until = await backend.store.record_failure("p", "m", cfg, None, NOW)
    assert failures == 70
    assert until == NOW + 1e300  # 1e10 ** 64 is capped at max_backoff, not inf


async def test_health_snapshot_lists_every_model_with_failures(backend: Backend) -> None:
    store = backend.store
    cfg = HealthConfig(initial_backoff=10.0, max_backoff=100.0, failure_threshold=2)
    assert await store.health_snapshot() == {}
    await store.record_failure("openai", "gpt-4o", cfg, None, NOW)  # below the threshold
    await store.record_failure("ollama", "llama3:8b", cfg, None, NOW)  # ':' in a model name
    await store.record_failure("ollama", "llama3:8b", cfg, 42.5, NOW + 1)
    await store.record_failure("anthropic", "claude", cfg, None, NOW)
    await store.record_failure("anthropic", "claude", cfg, None, NOW)
    await store.record_failure("anthropic", "claude", cfg, None, NOW + 2)
    assert await store.health_snapshot() == {
        ("openai", "gpt-4o"): (1, 0.0),
        ("ollama", "llama3:8b"): (2, NOW + 1 + 42.5),
        ("anthropic", "claude"): (3, NOW + 2 + 20.0),
    }


async def test_record_success_clears_the_model_only(backend: Backend) -> None:
    store = backend.store
    cfg = HealthConfig(initial_backoff=10.0, max_backoff=100.0)
    for _ in range(3):
        await store.record_failure("p", "a", cfg, None, NOW)
    await store.record_failure("p", "b", cfg, None, NOW)
    await store.record_success("p", "a")
    await store.record_success("p", "never-failed")  # a no-op
    assert await store.health_snapshot() == {("p", "b"): (1, NOW + 10.0)}
    assert await store.record_failure("p", "a", cfg, None, NOW) == (1, NOW + 10.0)  # from 1 again


async def test_probe_lease_is_exclusive_until_released_or_expired(backend: Backend) -> None:
    store = backend.store
    assert await store.try_probe("p", "m", 60.0) is True
    ttl = backend.probe_ttl("p", "m")
    assert ttl is not None
    assert 59.9 < ttl <= 60.0
    assert await store.try_probe("p", "m", 60.0) is False
    assert await store.try_probe("p", "other", 60.0) is True  # per model

    await store.release_probe("p", "m")
    assert await store.try_probe("p", "m", 60.0) is True
    assert await store.try_probe("p", "m", 60.0) is False

    backend.expire_probe("p", "m")
    assert await store.try_probe("p", "m", 60.0) is True
    await store.release_probe("p", "never-taken")  # a no-op


async def test_ping_and_count(backend: Backend) -> None:
    store = backend.store
    assert await store.ping() is True
    await store.put_session("a", REC, 60.0)
    await store.put_session("b", REC, 60.0)
    # Memory counts cheaply; counting Redis keys is not cheap, so it does not.
    assert await store.session_count() == (2 if backend.kind == "memory" else None)


# -- memory only ------------------------------------------------------------------------------------


async def test_memory_lru_is_bounded() -> None:
    clock = FakeClock(NOW)
    store = MemoryStore(max_sessions=100, clock=clock)
    for i in range(1000):
        await store.put_session(f"k{i}", REC, 60.0)
    assert await store.session_count() == 100
    assert store.sessions_held == 100
    assert await store.get_session("k0", 60.0) is None
    assert await store.get_session("k899", 60.0) is None
    assert await store.get_session("k900", 60.0) == REC
    assert await store.get_session("k999", 60.0) == REC


async def test_memory_read_makes_a_session_most_recent() -> None:
    store = MemoryStore(max_sessions=3, clock=FakeClock(NOW))
    for key in ("a", "b", "c"):
        await store.put_session(key, REC, 60.0)
    assert await store.get_session("a", 60.0) == REC
    await store.put_session("d", REC, 60.0)  # evicts the least recently used: b
    assert await store.get_session("b", 60.0) is None
    for key in ("a", "c", "d"):
        assert await store.get_session(key, 60.0) == REC


async def test_memory_sliding_expiry() -> None:
    clock = FakeClock(NOW)
    store = MemoryStore(clock=clock)
    await store.put_session("k", REC, 10.0)
    clock.advance(9.9)
    assert await store.get_session("k", 10.0) == REC  # restarts the 10 s
    clock.advance(9.9)
    assert await store.get_session("k", 10.0) == REC
    clock.advance(10.0)
    assert await store.get_session("k", 10.0) is None
    assert store.session_expiry("k") is None  # dropped, not kept around
    assert await store.session_count() == 0


async def test_memory_stays_flat_under_endless_new_ids() -> None:
    clock = FakeClock(NOW)
    store = MemoryStore(max_sessions=100_000, clock=clock)
    for i in range(20_000):
        await store.put_session(f"k{i}", REC, 1.0)
        clock.advance(0.01)  # each session outlives the next 100 writes only
        assert await store.get_session(f"unknown{i}", 1.0) is None  # reads allocate nothing
    assert store.sessions_held <= 101
    assert 98 <= await store.session_count() <= 101


async def test_memory_session_count_drops_expired() -> None:
    clock = FakeClock(NOW)
    store = MemoryStore(clock=clock)
    for i in range(5):
        await store.put_session(f"k{i}", REC, 10.0)
        clock.advance(1.0)
    assert await store.session_count() == 5
    clock.advance(6.5)  # k0..k1 (written at +0, +1) have expired
    assert await store.session_count() == 3


async def test_memory_lock_and_probe_expire_with_the_clock() -> None:
    clock = FakeClock(NOW)
    store = MemoryStore(clock=clock)
    assert await store.try_lock("l", 5.0) is not None
    assert await store.try_probe("p", "m", 5.0) is True
    clock.advance(4.99)
    assert await store.try_lock("l", 5.0) is None
    assert await store.try_probe("p", "m", 5.0) is False
    clock.advance(0.02)
    assert await store.try_lock("l", 5.0) is not None
    assert await store.try_probe("p", "m", 5.0) is True


async def test_memory_config_copy_is_a_copy() -> None:
    store = MemoryStore()
    raw = bytearray(b'{"a": 1}')
    await store.put_config(raw, NOW)  # type: ignore[arg-type]
    raw[:] = b"changed!"
    assert await store.get_config() == (b'{"a": 1}', NOW)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_memory_rejects_a_bad_bound(bad: object) -> None:
    with pytest.raises(ValueError, match="max_sessions"):
        MemoryStore(max_sessions=bad)  # type: ignore[arg-type]


# -- redis only: layout ---------------------------------------------------------------------------


@pytest.mark.redis
async def test_redis_key_layout(redis_store: RedisStore, redis_server: RedisServer) -> None:
    cfg = HealthConfig(initial_backoff=10.0, max_backoff=100.0)
    await redis_store.put_session("owner:s1", REC, 60.0)
    await redis_store.put_config(b"{}", NOW)
    await redis_store.record_failure("openai", "gpt-4o", cfg, None, NOW)
    await redis_store.try_probe("openai", "gpt-4o", 60.0)
    token = await redis_store.try_lock("refresh", 60.0)
    with redis_server.client() as raw:
        assert raw.get("tier:s:owner:s1") == REC.dumps()
        assert raw.hgetall("tier:config") == {b"raw": b"{}", b"fetched_at": repr(NOW).encode()}
        failures, until, since = raw.hget("tier:health", "openai\ngpt-4o").split(b":")  # type: ignore[union-attr]
        assert (int(failures), float(until), float(since)) == (1, NOW + 10.0, NOW)
        assert raw.get("tier:probe:openai\ngpt-4o") == b"1"
        assert raw.get("tier:lock:refresh") == token.encode()  # type: ignore[union-attr]
        assert sorted(raw.keys("*")) == [
            b"tier:config",
            b"tier:health",
            b"tier:lock:refresh",
            b"tier:probe:openai\ngpt-4o",
            b"tier:s:owner:s1",
        ]


@pytest.mark.redis
async def test_redis_config_copy_never_expires(
    redis_store: RedisStore, redis_server: RedisServer
) -> None:
    await redis_store.put_config(b'{"v": 1}', NOW)
    await redis_store.put_config(b'{"v": 2}', NOW + 1)
    assert redis_server.command("TTL", "tier:config") == -1  # exists, and has no expiry
    assert await redis_store.get_config() == (b'{"v": 2}', NOW + 1)


@pytest.mark.redis
async def test_redis_prefixes_keep_deployments_apart(redis_server: RedisServer) -> None:
    cfg = HealthConfig()
    async with (
        aclosing(RedisStore(redis_server.url, prefix="a:")) as a,
        aclosing(RedisStore(redis_server.url, prefix="b:")) as b,
    ):
        await a.put_session("k", REC, 60.0)
        await a.put_config(b"{}", NOW)
        await a.record_failure("p", "m", cfg, None, NOW)
        assert await a.try_probe("p", "m", 60.0)
        assert await a.try_lock("l", 60.0)
        assert await b.get_session("k", 60.0) is None
        assert await b.get_config() is None
        assert await b.health_snapshot() == {}
        assert await b.try_probe("p", "m", 60.0)
        assert await b.try_lock("l", 60.0)


@pytest.mark.redis
async def test_redis_snapshot_skips_foreign_health_fields(
    redis_store: RedisStore, redis_server: RedisServer
) -> None:
    redis_server.command(
        "HSET", "tier:health", "no-newline", "1:2", "p\nm", "garbage", "p\nok", "2:123.5"
    )
    assert await redis_store.health_snapshot() == {("p", "ok"): (2, 123.5)}
    # and a corrupt value counts as no failures when the next one is recorded
    cfg = HealthConfig(initial_backoff=5.0, max_backoff=5.0)
    assert await redis_store.record_failure("p", "m", cfg, None, NOW) == (1, NOW + 5.0)


@pytest.mark.redis
async def test_get_session_and_health_is_one_round_trip(
    redis_store: RedisStore, redis_server: RedisServer
) -> None:
    """The server counts read events per client socket (`total_reads_processed`): a pipeline
    arrives in one read, two commands sent one after the other in two. The same measurement
    run on `get_session` + `health_snapshot` must show one more read, proving it discriminates;
    `cmdstat_*` proves both commands ran. (Our own INFO adds one read to each delta.)"""
    await redis_store.put_session("k", REC, 60.0)
    assert await redis_store.ping()  # the store's connection is open: no handshake below

    with redis_server.client() as raw:

        def counters() -> tuple[int, int, int]:
            info = raw.info("all")
            return (
                info["total_reads_processed"],
                info.get("cmdstat_getex", {}).get("calls", 0),
                info.get("cmdstat_hgetall", {}).get("calls", 0),
            )

        counters()  # open the INFO connection first
        before = counters()
        assert await redis_store.get_session_and_health("k", 60.0) == (REC, {})
        after = counters()
        assert [b - a for a, b in zip(before, after, strict=True)] == [1 + 1, 1, 1]

        before = counters()
        await redis_store.get_session("k", 60.0)
        await redis_store.health_snapshot()
        after = counters()
        assert [b - a for a, b in zip(before, after, strict=True)] == [1 + 2, 1, 1]


@pytest.mark.redis
async def test_redis_over_a_unix_socket(redis_server: RedisServer) -> None:
    async with aclosing(store_from_url(redis_server.unix_url)) as store:
        assert isinstance(store, RedisStore)
        await store.put_session("k", REC, 60.0)
        assert await store.get_session("k", 60.0) == REC
    with redis_server.client() as raw:  # the same server as the TCP URL
        assert raw.get("tier:s:k") == REC.dumps()


# -- redis only: failures -------------------------------------------------------------------------


def _calls(store: Store) -> dict[str, Call]:
    """One coroutine factory per Store method that talks to the backend."""
    cfg = HealthConfig()
    return {
        "get_session": lambda: store.get_session("k", 60.0),
        "put_session": lambda: store.put_session("k", REC, 60.0),
        "get_session_and_health": lambda: store.get_session_and_health("k", 60.0),
        "get_config": lambda: store.get_config(),
        "put_config": lambda: store.put_config(b"{}", NOW),
        "try_lock": lambda: store.try_lock("l", 5.0),
        "unlock": lambda: store.unlock("l", "token"),
        "hold_lock": lambda: store.hold_lock("l", "token", 5.0),
        "health_snapshot": lambda: store.health_snapshot(),
        "record_failure": lambda: store.record_failure("p", "m", cfg, None, NOW),
        "record_success": lambda: store.record_success("p", "m"),
        "try_probe": lambda: store.try_probe("p", "m", 5.0),
        "release_probe": lambda: store.release_probe("p", "m"),
    }


async def _fails_fast(call: Call, *causes: type[BaseException]) -> None:
    start = time.monotonic()
    with pytest.raises(StoreError) as caught:
        await call()
    elapsed = time.monotonic() - start
    assert elapsed < FAST, f"took {elapsed:.3f}s"
    assert isinstance(caught.value.__cause__, causes), repr(caught.value.__cause__)


async def _ping_fails_fast(store: Store) -> None:
    start = time.monotonic()
    assert await store.ping() is False
    assert time.monotonic() - start < FAST


@pytest.mark.redis
async def test_a_silent_server_fails_every_call_fast_with_one_attempt(
    black_hole: BlackHole,
) -> None:
    """A server that accepts and never answers: each call gives up after one socket timeout.
    redis-py retries reconnect, so exactly one accepted connection per call proves no retry."""
    async with aclosing(RedisStore(black_hole.url)) as store:
        for name, call in _calls(store).items():
            before = black_hole.accepted()
            await _fails_fast(call, RedisTimeoutError)
            assert black_hole.accepted() - before == 1, name
        await _ping_fails_fast(store)


@pytest.mark.redis
async def test_a_killed_server_fails_fast_and_the_store_recovers_on_restart(
    fresh_redis_server: RedisServer,
) -> None:
    server = fresh_redis_server
    cfg = HealthConfig(initial_backoff=10.0, max_backoff=100.0)
    async with aclosing(RedisStore(server.url)) as store:
        await store.put_session("k", REC, 60.0)
        assert await store.record_failure("p", "m", cfg, None, NOW) == (1, NOW + 10.0)
        server.kill()
        for call in _calls(store).values():
            await _fails_fast(call, RedisConnectionError)
        assert await store.ping() is False

        server.start()  # the same port; nothing persisted
        assert await store.ping() is True
        assert await store.get_session("k", 60.0) is None
        await store.put_session("k", REC, 60.0)
        assert await store.get_session("k", 60.0) == REC
        # the Lua script is gone from the new server's cache: it is loaded again by itself
        assert await store.record_failure("p", "m", cfg, None, NOW) == (1, NOW + 10.0)
        token = await store.try_lock("l", 5.0)
        assert token is not None
        await store.unlock("l", token)
        assert await store.try_lock("l", 5.0) is not None


@pytest.mark.redis
async def test_a_paused_server_fails_within_the_socket_timeout(
    fresh_redis_server: RedisServer,
) -> None:
    """CLIENT PAUSE ... ALL: connected, accepting, and not answering anything for 2 s."""
    server = fresh_redis_server
    async with aclosing(RedisStore(server.url, socket_timeout=0.1)) as store:
        await store.put_session("k", REC, 60.0)  # a pooled connection exists
        server.pause(2000)
        await _fails_fast(lambda: store.get_session("k", 60.0), RedisTimeoutError)
        await _fails_fast(lambda: store.get_session_and_health("k", 60.0), RedisTimeoutError)
        await _fails_fast(
            lambda: store.record_failure("p", "m", HealthConfig(), None, NOW), RedisTimeoutError
        )
        await _ping_fails_fast(store)


@pytest.mark.redis
async def test_a_hung_server_fails_fast_and_the_store_recovers_when_it_resumes(
    fresh_redis_server: RedisServer,
) -> None:
    """SIGSTOP: the kernel still completes connections, the process reads nothing."""
    server = fresh_redis_server
    async with aclosing(RedisStore(server.url)) as store:
        await store.put_session("k", REC, 60.0)
        server.freeze()
        try:
            for call in _calls(store).values():
                await _fails_fast(call, RedisTimeoutError)
        finally:
            server.thaw()
        assert await store.get_session("k", 60.0) == REC  # the same store, answering again
        assert await store.ping() is True


@pytest.mark.redis
async def test_nothing_listening_fails_fast() -> None:
    async with aclosing(RedisStore(f"redis://127.0.0.1:{free_port()}/0")) as store:
        await _fails_fast(lambda: store.get_session("k", 60.0), RedisConnectionError)
        assert await store.ping() is False


# -- any backend: errors are StoreErrors, wrapped once by the base class ---------------------------


def broken_store(kind: type[BaseException], **options: bool) -> Store:
    """A backend written with no thought for errors: each of its calls raises `kind`."""

    async def fail(*args: object, **kwargs: object) -> Any:
        raise kind("no route to host")

    calls = {name: fail for name in Store.__abstractmethods__ | {"session_count"}}
    return type("Broken", (Store,), {"name": "broken", **calls}, **options)()  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", [OSError, RuntimeError, KeyError, AttributeError])
async def test_whatever_a_backend_raises_reaches_the_caller_as_a_store_error(
    kind: type[Exception],
) -> None:
    store = broken_store(kind)
    calls = {**_calls(store), "session_count": store.session_count}
    for name, call in calls.items():
        with pytest.raises(StoreError) as caught:
            await call()
        assert type(caught.value.__cause__) is kind, name
        assert (
            str(caught.value)
            == f"broken {name} failed: {kind.__name__}: {kind('no route to host')}"
        )


async def test_an_override_calling_its_base_raises_one_store_error_not_two() -> None:
    base = type(broken_store(RuntimeError))

    class Override(base):  # type: ignore[valid-type,misc]
        async def get_session(self, key: str, ttl: float) -> SessionRecord | None:
            return await super().get_session(key, ttl)  # type: ignore[no-any-return]

    with pytest.raises(StoreError) as caught:
        await Override().get_session("k", 60.0)
    assert type(caught.value.__cause__) is RuntimeError
    assert str(caught.value) == "broken get_session failed: RuntimeError: no route to host"


async def test_cancellation_is_no_store_error() -> None:
    store = broken_store(asyncio.CancelledError)
    with pytest.raises(asyncio.CancelledError):
        await store.get_session("k", 60.0)


async def test_a_backend_that_cannot_fail_may_leave_its_calls_unwrapped() -> None:
    with pytest.raises(KeyError):
        await broken_store(KeyError, wrap_errors=False).get_session("k", 60.0)


# -- store_from_url ---------------------------------------------------------------------------------


async def test_store_from_url_picks_the_backend() -> None:
    assert isinstance(store_from_url(None), MemoryStore)
    memory = store_from_url("memory://", max_sessions=7)
    assert isinstance(memory, MemoryStore)
    assert memory.max_sessions == 7
    for url in ("redis://localhost:6379/0", "rediss://cache.example:6380", "unix:///tmp/r.sock"):
        async with aclosing(store_from_url(url, prefix="x:", socket_timeout=0.2)) as store:
            assert isinstance(store, RedisStore)
            assert store.name == "redis"
            assert store.prefix == "x:"


@pytest.mark.parametrize(
    "url", ["", "localhost:6379", "http://localhost", "memcached://h:11211", "redis"]
)
def test_store_from_url_rejects_other_schemes(url: str) -> None:
    with pytest.raises(ValueError, match=r"memory://, redis://, rediss://, unix://"):
        store_from_url(url)


def test_store_from_url_keeps_passwords_out_of_errors() -> None:
    with pytest.raises(ValueError, match="unsupported") as caught:
        store_from_url("http://user:s3cret@host:1/")
    assert "s3cret" not in str(caught.value)
