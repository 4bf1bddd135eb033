"""ConfigManager: the hot path, refresh ahead of expiry, single-flight, last-known-good, the
fallback, static sources, and a fleet sharing one copy through a store.

It fetches from a real HTTP control plane on a loopback port. Time is moved with injected clocks;
the only real waiting is for background tasks to finish and, in the timeout tests, for the
(deliberately short) timeouts themselves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from _clock import FakeClock
from config_harness import REFRESH_AT, RETRY, TTL, Make, cp_source, warnings_of
from control_plane import ControlPlane, tier_payload
from tier_middleware import ConfigError, TierConfig
from tier_middleware._config_manager import ConfigManager
from tier_middleware._control_plane import ControlPlaneSource
from tier_middleware._stores.base import StoreError
from tier_middleware._stores.memory import MemoryStore

pytestmark = pytest.mark.anyio

LOCK_RETRY = 3.0  # min(retry_interval, timeout + 1) with the default 2 s timeout

FALLBACK: dict[str, Any] = {
    "version": "fallback",
    "tiers": {
        "simple": [{"provider": "openai", "model": "gpt-4o-mini", "relative_cost": 1}],
        "moderate": [{"provider": "openai", "model": "gpt-4o", "relative_cost": 5}],
        "complex": [{"provider": "anthropic", "model": "claude-opus", "relative_cost": 20}],
    },
}


# -- the hot path ---------------------------------------------------------------------------------


async def test_the_hot_path_makes_no_request_before_the_refresh_point(
    control_plane: ControlPlane, make: Make
) -> None:
    h = make(cp_source(control_plane))
    await h.manager.ready()
    h.advance(REFRESH_AT - 0.001)

    for _ in range(10_000):
        h.manager.tick()

    assert not h.manager.refreshing
    await h.manager.wait_idle()
    assert control_plane.hits == 1
    assert h.results == ["success"]


async def test_tick_between_refreshes_only_reads_the_clock(control_plane: ControlPlane) -> None:
    """Every routed request ticks: while nothing is due, one clock read and nothing else
    (its cost is measured by bench/config_tick.py)."""
    reads = []
    clock = FakeClock()

    def counting() -> float:
        reads.append(None)
        return clock()

    async with ConfigManager(cp_source(control_plane), clock=counting) as m:
        await m.ready()
        reads.clear()
        for _ in range(1000):
            m.tick()
        assert len(reads) == 1000
        assert not m.refreshing
        assert control_plane.hits == 1


async def test_refresh_ahead_of_expiry_starts_exactly_one_background_fetch(
    control_plane: ControlPlane, make: Make
) -> None:
    h = make(cp_source(control_plane))
    m = h.manager
    await m.ready()
    control_plane.serve("2")
    h.advance(REFRESH_AT)

    for _ in range(1_000):
        m.tick()
    assert m.refreshing
    assert m.current is not None
    assert m.current.version == "1"  # tick() never waits for the fetch

    async def requests() -> None:
        for _ in range(100):
            m.tick()
            await asyncio.sleep(0)

    await asyncio.gather(*(m.refresh() for _ in range(100)), *(requests() for _ in range(20)))
    await m.wait_idle()

    assert control_plane.hits == 2
    assert m.current.version == "2"
    assert h.versions == ["1", "2"]
    assert h.results == ["success", "success"]

    # The next refresh is due a whole refresh period after this one.
    m.tick()
    assert not m.refreshing
    await h.tick_after(REFRESH_AT - 0.01)
    assert control_plane.hits == 2
    await h.tick_after(0.01)
    assert control_plane.hits == 3
    assert h.results[-1] == "unchanged"
    assert h.versions == ["1", "2"]


@pytest.mark.parametrize("call", ["refresh", "ready"])
async def test_concurrent_callers_share_one_fetch(
    control_plane: ControlPlane, make: Make, call: str
) -> None:
    m = make(cp_source(control_plane)).manager

    await asyncio.gather(*(getattr(m, call)() for _ in range(100)))

    assert control_plane.hits == 1
    assert m.current is not None


# -- stale-if-error ------------------------------------------------------------------------------


async def test_one_warning_per_failure_streak_and_info_on_recovery(
    control_plane: ControlPlane, make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tier_middleware")
    h = make(cp_source(control_plane))
    await h.manager.ready()
    control_plane.behaviour = "error500"

    await h.tick_after(REFRESH_AT)
    for _ in range(4):
        await h.tick_after(RETRY)

    assert control_plane.hits == 6
    assert h.results == ["success"] + ["error"] * 5
    [warning] = warnings_of(caplog)
    assert "HTTP 500" in warning.getMessage()
    assert "serving control_plane config version 1" in warning.getMessage()
    assert warning.__dict__["config_source"] == control_plane.url
    assert warning.__dict__["error_kind"] == "status"
    assert warning.__dict__["status_code"] == 500
    assert warning.__dict__["config_version"] == "1"
    assert warning.__dict__["consecutive_failures"] == 1
    assert warning.__dict__["retry_in"] == RETRY

    control_plane.serve("2")
    await h.tick_after(RETRY)

    assert h.manager.current is not None
    assert h.manager.current.version == "2"
    assert h.versions == ["1", "2"]  # on_change once for the recovery
    assert h.results[-1] == "success"
    [recovered] = [r for r in caplog.records if "recovered" in r.getMessage()]
    assert recovered.levelno == logging.INFO
    assert recovered.__dict__["previous_failures"] == 5
    assert h.manager.consecutive_failures == 0
    assert h.manager.last_error is None

    # A new failure streak warns again, once.
    control_plane.behaviour = "html"
    await h.tick_after(REFRESH_AT)
    await h.tick_after(RETRY)
    assert len(warnings_of(caplog)) == 2
    assert "not JSON" in warnings_of(caplog)[1].getMessage()


async def test_a_failed_refresh_is_retried_after_a_backoff_not_per_request(
    control_plane: ControlPlane, make: Make
) -> None:
    h = make(cp_source(control_plane))
    await h.manager.ready()
    control_plane.behaviour = "error500"
    await h.tick_after(REFRESH_AT)
    assert control_plane.hits == 2

    h.advance(RETRY - 0.01)
    for _ in range(1_000):
        h.manager.tick()
    await h.manager.wait_idle()
    assert control_plane.hits == 2

    await h.tick_after(0.01)
    assert control_plane.hits == 3


async def test_retry_interval_defaults_to_min_ttl_30s_and_can_be_set(
    control_plane: ControlPlane,
) -> None:
    assert ConfigManager(cp_source(control_plane, ttl=1800)).retry_interval == 30.0
    assert ConfigManager(cp_source(control_plane, ttl=10)).retry_interval == 10.0
    custom = ConfigManager(cp_source(control_plane), retry_interval=5)
    assert custom.retry_interval == 5.0


async def test_the_fallback_is_used_when_the_control_plane_is_down_at_start(
    control_plane: ControlPlane, make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tier_middleware")
    await control_plane.stop()
    h = make(cp_source(control_plane), fallback=FALLBACK)

    config = await h.manager.ready()

    assert config is not None
    assert config.version == "fallback"
    assert h.manager.origin == "fallback"
    assert h.results == ["error"]
    assert h.versions == ["fallback"]
    [warning] = warnings_of(caplog)
    assert "serving fallback config version fallback" in warning.getMessage()
    assert await h.manager.ready() is config  # no waiting once there is a config

    await control_plane.start()  # back on the same port
    await h.tick_after(RETRY)

    assert h.manager.current is not None
    assert (h.manager.current.version, h.manager.origin) == ("1", "control_plane")
    assert h.versions == ["fallback", "1"]
    assert h.results == ["error", "success"]


async def test_without_any_config_current_stays_none_and_fetches_back_off(
    control_plane: ControlPlane, make: Make
) -> None:
    control_plane.behaviour = "zero_cost"
    h = make(cp_source(control_plane))

    assert await h.manager.ready() is None
    assert h.manager.current is None
    assert control_plane.hits == 1
    assert await h.manager.ready() is None  # within the backoff: no new request
    assert control_plane.hits == 1

    h.advance(RETRY)
    assert await h.manager.ready() is None
    assert control_plane.hits == 2

    control_plane.serve("3")
    h.advance(RETRY)
    config = await h.manager.ready()
    assert config is not None
    assert config.version == "3"
    assert h.results == ["error", "error", "success"]
    assert h.versions == ["3"]


# -- waiting for a config ------------------------------------------------------------------------


async def test_ready_timeout_bounds_the_wait_and_serves_the_fallback_meanwhile(
    control_plane: ControlPlane, make: Make
) -> None:
    control_plane.behaviour = "slow"
    h = make(cp_source(control_plane, timeout=5.0), fallback=FALLBACK)

    start = time.perf_counter()
    config = await h.manager.ready(timeout=0.2)
    elapsed = time.perf_counter() - start

    assert elapsed < 0.2 + 0.5, f"ready(timeout=0.2) took {elapsed:.2f}s"
    assert config is not None
    assert config.version == "fallback"
    assert h.manager.refreshing  # the fetch carries on in the background
    assert control_plane.hits == 1

    start = time.perf_counter()
    await h.manager.aclose()  # cancels it promptly
    assert time.perf_counter() - start < 0.5
    assert not h.manager.refreshing
    h.advance(10 * TTL)
    h.manager.tick()  # a closed manager never starts another refresh
    assert not h.manager.refreshing
    assert control_plane.hits == 1


async def test_ready_without_a_fallback_returns_none_on_timeout_and_the_fetch_lands_later(
    control_plane: ControlPlane, make: Make
) -> None:
    control_plane.behaviour = "slow"
    control_plane.delay = 0.3
    h = make(cp_source(control_plane))

    assert await h.manager.ready(timeout=0.01) is None
    await h.manager.wait_idle()

    assert h.manager.current is not None
    assert h.versions == ["1"]
    assert control_plane.hits == 1


# -- static sources and validation -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["TierConfig", "dict", "json", "toml"])
async def test_a_static_source_is_loaded_once_and_never_refreshes(
    make: Make, tmp_path: Path, kind: str
) -> None:
    source: Any
    if kind == "TierConfig":
        source, name = TierConfig.load(FALLBACK), "config"
    elif kind == "dict":
        source, name = FALLBACK, "dict"
    elif kind == "json":
        source = tmp_path / "tiers.json"
        source.write_text(json.dumps(FALLBACK))
        name = str(source)
    else:
        source = tmp_path / "tiers.toml"
        source.write_text(
            'version = "fallback"\n'
            + "".join(
                f'[[tiers.{t}]]\nprovider = "{m[0]["provider"]}"\nmodel = "{m[0]["model"]}"\n'
                f"relative_cost = {m[0]['relative_cost']}\n"
                for t, m in FALLBACK["tiers"].items()
            )
        )
        name = str(source)
    h = make(source)
    m = h.manager
    config = m.current
    assert config is not None
    assert config == TierConfig.load(FALLBACK)
    assert m.source_name == name
    assert m.origin == "static"

    h.advance(1e9)
    for _ in range(1_000):
        m.tick()
    await m.refresh()
    assert await m.ready() is config
    assert not m.refreshing
    assert m.current is config
    assert h.results == []
    assert h.changes == []


def test_a_bad_static_or_fallback_config_fails_at_construction() -> None:
    with pytest.raises(ConfigError, match="has no models"):
        ConfigManager({"tiers": {}})
    with pytest.raises(ConfigError, match="relative_cost"):
        ConfigManager(
            ControlPlaneSource("http://127.0.0.1:1/api/v1/tiers/config"),
            fallback={
                "tiers": {
                    "simple": [{"provider": "a", "model": "b", "relative_cost": 0}],
                }
            },
        )


def test_manager_arguments_are_validated() -> None:
    source = ControlPlaneSource("https://cp.example.com/x")
    with pytest.raises(ValueError, match="refresh_ahead"):
        ConfigManager(source, refresh_ahead=0)
    with pytest.raises(ValueError, match="refresh_ahead"):
        ConfigManager(source, refresh_ahead=1.5)
    with pytest.raises(ValueError, match="retry_interval"):
        ConfigManager(source, retry_interval=0)


# -- callbacks and event loops -------------------------------------------------------------------


async def test_callback_errors_are_logged_and_do_not_stop_refreshing(
    control_plane: ControlPlane, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(_: object) -> None:
        raise RuntimeError("callback bug")

    mono, wall = FakeClock(), FakeClock(1_700_000_000.0)
    async with ConfigManager(
        cp_source(control_plane), clock=mono, wall_clock=wall, on_change=boom, on_refresh=boom
    ) as m:
        assert await m.ready() is not None
        control_plane.serve("2")
        mono.advance(REFRESH_AT)
        m.tick()
        await m.wait_idle()
        assert m.current is not None
        assert m.current.version == "2"
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert {r.getMessage() for r in failures} == {
        "on_change callback failed",
        "on_refresh callback failed",
    }
    assert len(failures) == 4


def test_a_manager_survives_a_new_event_loop() -> None:
    """Starlette's TestClient runs each request in a fresh event loop: no stale task or client."""
    cp = ControlPlane()
    mono, wall = FakeClock(), FakeClock(1_700_000_000.0)
    box: dict[str, ConfigManager] = {}

    async def first() -> None:
        async with cp:
            box["m"] = ConfigManager(cp_source(cp), clock=mono, wall_clock=wall)
            assert await box["m"].ready() is not None

    async def second() -> None:
        cp.serve("2")
        async with cp:  # same port, new loop
            m = box["m"]
            mono.advance(REFRESH_AT)
            m.tick()
            await m.wait_idle()
            assert m.current is not None
            assert m.current.version == "2"
            await m.aclose()

    asyncio.run(first())
    asyncio.run(second())
    assert cp.hits == 2


# -- a fleet sharing a store -----------------------------------------------------------------------


class LockHeldStore(MemoryStore):
    """Another instance holds the config lock (for good, or for its first `free_after` asks);
    optionally the copy is never written."""

    def __init__(
        self, *, keep_copies: bool = True, free_after: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.keep_copies = keep_copies
        self.free_after = free_after
        self.asked = 0

    async def try_lock(self, name: str, ttl: float) -> str | None:
        self.asked += 1
        if self.free_after is not None and self.asked > self.free_after:
            return await super().try_lock(name, ttl)
        return None

    async def put_config(self, raw: bytes, fetched_at: float) -> None:
        if self.keep_copies:
            await super().put_config(raw, fetched_at)


class HolderDelivers(LockHeldStore):
    """The lock holder's fetch lands in the store while this instance waits for it."""

    async def try_lock(self, name: str, ttl: float) -> str | None:
        if self.asked == 1:  # the second ask: this instance is waiting for the holder
            await self.put_config(envelope("7"), self.clock())
        return await super().try_lock(name, ttl)


class BrokenStore(MemoryStore):
    async def get_config(self) -> tuple[bytes, float] | None:
        raise StoreError("connection refused")

    async def put_config(self, raw: bytes, fetched_at: float) -> None:
        raise StoreError("connection refused")

    async def try_lock(self, name: str, ttl: float) -> str | None:
        raise StoreError("connection refused")


def envelope(version: str) -> bytes:
    return json.dumps({"success": True, "data": tier_payload(version)}).encode()


async def test_two_instances_sharing_a_store_ask_the_control_plane_once_per_period(
    control_plane: ControlPlane, make: Make
) -> None:
    store = MemoryStore()
    a = make(cp_source(control_plane), store=store)
    b = make(cp_source(control_plane), store=store)
    store.clock = a.wall  # the lock expires on the fleet's (fake) wall clock

    await a.manager.ready()
    await b.manager.ready()
    assert control_plane.hits == 1
    assert (a.results, b.results) == (["success"], ["shared"])
    assert b.manager.current == a.manager.current
    assert b.manager.origin == "store"

    for period in range(1, 6):
        if period == 3:
            control_plane.serve("2")
        a.advance(REFRESH_AT)  # both refresh points pass: both tick
        a.manager.tick()
        b.manager.tick()
        await a.manager.wait_idle()
        await b.manager.wait_idle()
        a.advance(LOCK_RETRY)  # the one that found the lock held looks again
        a.manager.tick()
        b.manager.tick()
        await a.manager.wait_idle()
        await b.manager.wait_idle()
        assert control_plane.hits == 1 + period  # not 2 per period

    for h in (a, b):
        assert h.manager.current is not None
        assert h.manager.current.version == "2"
        assert h.versions == ["1", "2"]
    assert "shared" in a.results[1:] or "shared" in b.results[1:]
    raw, fetched_at = await store.get_config() or (b"", 0.0)
    assert TierConfig.from_data(json.loads(raw)) == a.manager.current
    assert fetched_at <= a.wall.now


async def test_while_the_control_plane_fails_four_instances_fetch_about_as_often_as_one(
    control_plane: ControlPlane, make: Make
) -> None:
    """The figure: a minute of 500s from the control plane (on the fake clocks), four instances
    sharing a store against one instance alone. The lock decides who fetches, so the four ask
    about once per retry interval in total, as the one does (before: once each)."""
    retry, minute, step = 5.0, 60.0, 0.1
    store = MemoryStore()
    source = cp_source(control_plane, ttl=retry)  # due again 4 s after the first fetch
    fleet = [make(source, store=store, retry_interval=retry) for _ in range(4)]
    store.clock = fleet[0].wall  # locks expire on the fleet's (fake) wall clock
    async with ControlPlane() as lone_plane:
        lone_store = MemoryStore(clock=fleet[0].wall)
        lone = make(cp_source(lone_plane, ttl=retry), store=lone_store, retry_interval=retry)
        everyone = [*fleet, lone]
        for h in everyone:
            assert await h.manager.ready() is not None
        assert (control_plane.hits, lone_plane.hits) == (1, 1)  # the others shared the copy
        control_plane.behaviour = lone_plane.behaviour = "error500"
        clock = fleet[0]
        for _ in range(round(minute / step)):  # requests keep arriving: each instance ticks
            clock.advance(step)
            for h in everyone:
                h.manager.tick()
            for h in everyone:
                await h.manager.wait_idle()
        fleet_fetches, lone_fetches = control_plane.hits - 1, lone_plane.hits - 1
    print(f"fetches in a minute of 500s: 4 instances {fleet_fetches}, 1 instance {lone_fetches}")
    assert minute / retry - 2 <= lone_fetches <= minute / retry + 1
    assert fleet_fetches <= 1.5 * lone_fetches, (fleet_fetches, lone_fetches)
    for h in everyone:
        assert h.manager.current is not None  # last-known-good all along
        assert h.manager.current.version == "1"


async def test_a_fresh_store_copy_is_adopted_without_asking_the_control_plane(
    control_plane: ControlPlane, make: Make
) -> None:
    store = MemoryStore()
    h = make(cp_source(control_plane), store=store)
    await store.put_config(envelope("7"), h.wall.now - 10)

    config = await h.manager.ready()

    assert config is not None
    assert config.version == "7"
    assert control_plane.hits == 0
    assert h.results == ["shared"]
    assert h.manager.loaded_at == h.wall.now - 10

    await h.tick_after(REFRESH_AT - 10 - 0.01)  # refresh ahead of the copy's age, not ours
    assert control_plane.hits == 0
    await h.tick_after(0.01)
    assert control_plane.hits == 1
    assert h.manager.current is not None
    assert h.manager.current.version == "1"
    got = await store.get_config()
    assert got is not None
    assert got[1] == h.wall.now


async def test_the_store_copy_is_last_known_good_for_a_new_instance(
    control_plane: ControlPlane, make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStore()
    a = make(cp_source(control_plane), store=store)
    await a.manager.ready()
    await a.manager.aclose()
    a.advance(10 * TTL)  # the copy is long stale, and the control plane goes down
    await control_plane.stop()

    c = make(cp_source(control_plane), store=store, fallback=FALLBACK)
    config = await c.manager.ready()

    assert config is not None
    assert config.version == "1"  # the fleet's copy beats the built-in fallback
    assert c.manager.origin == "store"
    assert c.results == ["error"]
    [warning] = warnings_of(caplog)
    assert "serving store config version 1" in warning.getMessage()


async def test_a_fallback_gives_way_to_a_store_copy_that_appears_later(
    control_plane: ControlPlane, make: Make
) -> None:
    store = MemoryStore()
    await control_plane.stop()
    h = make(cp_source(control_plane), store=store, fallback=FALLBACK)
    store.clock = h.wall  # the lock it keeps after its failure expires on the fake wall clock
    assert h.manager.current is None
    await h.manager.ready()
    assert h.versions == ["fallback"]

    await store.put_config(envelope("5"), h.wall.now - 2 * TTL)  # stale, but a real config
    await h.tick_after(RETRY)

    assert h.manager.current is not None
    assert h.manager.current.version == "5"
    assert h.versions == ["fallback", "5"]
    assert h.results == ["error", "error"]


async def test_while_another_instance_holds_the_lock_its_copy_is_used(
    control_plane: ControlPlane, make: Make
) -> None:
    store = LockHeldStore()
    h = make(cp_source(control_plane), store=store)
    await store.put_config(envelope("4"), h.wall.now - 2 * TTL)  # stale

    config = await h.manager.ready()

    assert config is not None
    assert config.version == "4"
    assert control_plane.hits == 0
    assert h.results == ["shared"]
    await h.tick_after(LOCK_RETRY - 0.01)
    assert h.results == ["shared"]
    await h.tick_after(0.01)  # looks again soon, not a whole period later
    assert h.results == ["shared", "shared"]
    assert control_plane.hits == 0


async def test_with_the_lock_held_and_nothing_to_serve_an_instance_waits_for_the_holders_copy(
    control_plane: ControlPlane, make: Make
) -> None:
    store = HolderDelivers()
    h = make(cp_source(control_plane, timeout=0.5), store=store)
    store.clock = h.wall
    config = await h.manager.ready()
    assert config is not None
    assert config.version == "7"
    assert control_plane.hits == 0  # the lock decided: one fetch for the fleet, the holder's
    assert h.results == ["shared"]


async def test_with_nothing_to_serve_an_instance_fetches_once_the_lock_is_free(
    control_plane: ControlPlane, make: Make
) -> None:
    h = make(cp_source(control_plane), store=LockHeldStore(keep_copies=False, free_after=2))

    assert await h.manager.ready() is not None
    assert control_plane.hits == 1
    assert h.results == ["success"]


async def test_with_nothing_to_serve_and_the_lock_kept_after_a_failure_nobody_else_asks(
    control_plane: ControlPlane, make: Make
) -> None:
    """The holder's fetch failed, and it keeps the lock until its retry: an instance without
    any config waits at most the lock's TTL (the fetch timeout + 1 s, real time) and does not
    ask the control plane too; it tries again a lock retry later."""
    store = LockHeldStore(keep_copies=False)
    h = make(cp_source(control_plane, timeout=0.05), store=store)

    started = time.monotonic()
    assert await h.manager.ready() is None
    assert time.monotonic() - started < 0.05 + 1.0 + 0.5
    assert control_plane.hits == 0
    assert h.results == ["unchanged"]
    asked = store.asked
    assert asked >= 3  # it looked again while it waited

    store.free_after = asked  # the holder's hold ran out
    await h.tick_after(1.05)  # its lock retry: min(retry interval, timeout + 1)
    assert control_plane.hits == 1
    assert h.results == ["unchanged", "success"]


async def test_store_errors_never_fail_a_refresh(
    control_plane: ControlPlane, make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    store_errors: list[tuple[str, str]] = []
    h = make(
        cp_source(control_plane),
        store=BrokenStore(),
        on_store_error=lambda *error: store_errors.append(error),
    )

    config = await h.manager.ready()
    assert config is not None
    control_plane.serve("2")
    await h.tick_after(REFRESH_AT)

    assert control_plane.hits == 2
    assert h.results == ["success", "success"]
    [warning] = warnings_of(caplog)  # one per store outage, not one per refresh
    assert "store unavailable" in warning.getMessage()
    assert warning.__dict__["operation"] == "get_config"
    # ... but every failed call is counted (the middleware's llm_backend_errors_total).
    assert store_errors == [("memory", "get_config"), ("memory", "get_config")]


async def test_a_corrupt_store_copy_is_ignored(control_plane: ControlPlane, make: Make) -> None:
    store = MemoryStore()
    await store.put_config(b"<html>not a config</html>", 1e12)
    h = make(cp_source(control_plane), store=store)

    config = await h.manager.ready()

    assert config is not None
    assert config.version == "1"
    assert control_plane.hits == 1
    assert h.results == ["success"]
