"""Fleet on its own, in process: how a failing shared backend is called and fallen back from.

Time is a FakeClock given to the Fleet (its cooldown) and to the stores (TTLs): nothing sleeps.
The middleware-level behaviour is in tests/test_state.py, tests/test_session_blips.py and
tests/test_faults.py, against a real redis-server.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from _clock import FakeClock
from tier_middleware import HealthTracker
from tier_middleware._fleet import Fleet
from tier_middleware._stores import MemoryStore, SessionRecord

pytestmark = pytest.mark.anyio

RANKS = {"simple": 0, "moderate": 1, "complex": 2}
DOWN = "state backend failing; using in-process state"
UP = "state backend answering again"


class Flaky(MemoryStore):
    """A shared backend that raises on every call while `down`; `calls` counts them all."""

    name = "flaky"

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.down = False
        self.calls = 0

    def answer(self) -> None:
        self.calls += 1
        if self.down:
            raise ConnectionError("connection refused")

    async def get_session(self, key: str, ttl: float) -> SessionRecord | None:
        self.answer()
        return await super().get_session(key, ttl)

    async def put_session(self, key: str, record: SessionRecord, ttl: float) -> None:
        self.answer()
        await super().put_session(key, record, ttl)

    async def try_probe(self, provider: str, model: str, ttl: float) -> bool:
        self.answer()
        return await super().try_probe(provider, model, ttl)

    async def session_count(self) -> int:
        self.answer()
        return await super().session_count()


class Setup:
    def __init__(self, store: MemoryStore | None = None, **options: Any) -> None:
        self.clock = FakeClock(1_000_000.0)
        self.store = Flaky(self.clock) if store is None else store
        self.errors: list[tuple[str, str]] = []
        self.fleet = Fleet(
            self.store,
            HealthTracker(clock=self.clock),
            on_backend_error=lambda backend, operation: self.errors.append((backend, operation)),
            wall_clock=self.clock,
            clock=self.clock,
            **options,
        )

    def record(self, tier: str = "simple") -> SessionRecord:
        return SessionRecord("openai", "mini", tier, self.clock(), self.clock())


def logged(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "tier_middleware"]


async def test_a_failing_backend_is_skipped_for_its_cooldown_then_tried_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="tier_middleware")
    s = Setup(cooldown=1.0)
    store, fleet = s.store, s.fleet
    assert isinstance(store, Flaky)
    record = s.record()
    store.down = True
    await fleet.save_session("a", record)  # fails: counted, and written in process
    assert (store.calls, s.errors) == (1, [("flaky", "put_session")])
    assert await fleet.load_session("a", RANKS) == record  # skipped: the local copy answers
    s.clock.advance(0.99)
    await fleet.save_session("b", record)
    assert store.calls == 1  # not asked again during the cooldown
    assert fleet.written_locally == ("a", "b")

    s.clock.advance(0.02)
    store.down = False
    # Tried again by itself: it has no record of "a", so the local one is written back.
    assert await fleet.load_session("a", RANKS) == record
    assert store.calls == 3  # the read, and the write back
    assert store.session_expiry("a") is not None
    assert fleet.written_locally == ("b",)
    assert s.errors == [("flaky", "put_session")]
    assert logged(caplog) == [(logging.WARNING, DOWN), (logging.INFO, UP)]  # once each


async def test_every_failure_is_counted_and_only_the_first_is_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="tier_middleware")
    s = Setup(cooldown=0.0)  # ask the backend every time
    assert isinstance(s.store, Flaky)
    s.store.down = True
    for key in ("a", "b", "c"):
        await s.fleet.save_session(key, s.record())
    assert await s.fleet.load_session("a", RANKS) == s.record()
    assert s.errors == [("flaky", "put_session")] * 3 + [("flaky", "get_session")]
    assert logged(caplog) == [(logging.WARNING, DOWN)] + [(logging.DEBUG, DOWN)] * 3


async def test_the_probe_lease_falls_back_to_deciding_alone_and_a_count_is_quiet() -> None:
    s = Setup(cooldown=1.0)
    store, fleet = s.store, s.fleet
    assert isinstance(store, Flaky)
    store.down = True
    assert await fleet.probe_lease("openai", "mini") is True  # the fleet cannot say: alone
    assert s.errors == [("flaky", "try_probe")]
    assert await fleet.session_count() is None  # skipped in the cooldown
    s.clock.advance(1.0)
    calls = store.calls
    assert await fleet.session_count() is None  # a status read: neither counted nor a cooldown
    assert (store.calls, s.errors) == (calls + 1, [("flaky", "try_probe")])
    store.down = False
    assert await fleet.probe_lease("openai", "mini") is True
    assert await fleet.probe_lease("openai", "mini") is False  # held: exactly one probes
    assert await fleet.session_count() == 0


class Cancelled(MemoryStore):
    async def get_session(self, key: str, ttl: float) -> SessionRecord | None:
        raise asyncio.CancelledError


async def test_cancellation_is_no_backend_failure_and_propagates() -> None:
    s = Setup(Cancelled())
    with pytest.raises(asyncio.CancelledError):
        await s.fleet.load_session("a", RANKS)
    assert s.errors == []
    assert not s.fleet.outage.failing


class Down(MemoryStore):
    """A backend that never answers a session call."""

    async def get_session(self, key: str, ttl: float) -> SessionRecord | None:
        raise ConnectionError("down")

    async def put_session(self, key: str, record: SessionRecord, ttl: float) -> None:
        raise ConnectionError("down")


async def test_records_written_locally_are_bounded_by_max_sessions_and_the_ttl() -> None:
    s = Setup(Down(), session_ttl=60.0, max_sessions=10)
    fleet, record = s.fleet, s.record()
    for i in range(100):
        await fleet.save_session(f"k{i}", record)
    assert fleet.written_locally == tuple(f"k{i}" for i in range(90, 100))
    assert await fleet.local.session_count() == 10
    s.clock.advance(61.0)
    await fleet.save_session("late", record)
    assert fleet.written_locally == ("late",)  # the others are past the session TTL
