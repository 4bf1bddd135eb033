"""The in-process backend: everything in dicts, nothing shared, nothing that can fail.

It serves a single instance (no shared store configured) and is the fallback every instance uses
while a shared backend is failing. All methods run without awaiting, so on one event loop each
call is atomic. It is not meant to be shared between threads.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

from .._health import backoff_step
from .base import Failure, HealthSnapshot, SessionRecord, Store


class _Session:
    __slots__ = ("expires", "record")

    def __init__(self, record: SessionRecord, expires: float) -> None:
        self.record = record
        self.expires = expires  # on the store's clock


class MemoryStore(Store, wrap_errors=False):  # dict operations: nothing to wrap
    """Sessions in a bounded LRU with a sliding TTL per entry; locks, health and probe leases in
    plain dicts. `clock` returns wall-clock seconds (tests inject a fake one).

    Memory stays flat whatever the number of session ids: a write drops expired sessions from the
    least-recently-used end and then evicts beyond `max_sessions`; a read of an expired session
    drops it. Reads never allocate.
    """

    name = "memory"

    def __init__(self, *, max_sessions: int = 100_000, clock: Callable[[], float] = time.time):
        if isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or max_sessions < 1:
            raise ValueError(f"max_sessions must be an integer >= 1, got {max_sessions!r}")
        self.max_sessions = max_sessions
        self.clock = clock
        # Least recently used first. Every read and write moves an entry to the end and restarts
        # its expiry, so with one TTL for all sessions the front is also the first to expire.
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._config: tuple[bytes, float] | None = None
        self._locks: dict[str, tuple[str, float]] = {}  # name -> (token, expiry)
        # -> (failures, backoff end, backoff start)
        self._health: dict[tuple[str, str], tuple[int, float, float]] = {}
        self._probes: dict[tuple[str, str], float] = {}  # -> lease expiry

    # -- what it holds, read without touching anything (as Redis's PTTL reads a key) -----------

    @property
    def sessions_held(self) -> int:
        """Sessions in memory, the expired ones not dropped yet included."""
        return len(self._sessions)

    def session_expiry(self, key: str) -> float | None:
        """When the session expires (the store's clock), if it is held."""
        entry = self._sessions.get(key)
        return None if entry is None else entry.expires

    def lock_expiry(self, name: str) -> float | None:
        held = self._locks.get(name)
        return None if held is None else held[1]

    def probe_expiry(self, provider: str, model: str) -> float | None:
        return self._probes.get((provider, model))

    # -- sessions ------------------------------------------------------------------------------

    async def get_session(self, key: str, ttl: float) -> SessionRecord | None:
        entry = self._sessions.get(key)
        if entry is None:
            return None
        now = self.clock()
        record = entry.record
        if entry.expires <= now or not isinstance(record, SessionRecord):
            del self._sessions[key]  # expired (or not a record at all): gone for good
            return None
        entry.expires = now + ttl
        self._sessions.move_to_end(key)
        return record

    async def put_session(self, key: str, record: SessionRecord, ttl: float) -> None:
        sessions = self._sessions
        now = self.clock()
        entry = sessions.get(key)
        if entry is None:
            sessions[key] = _Session(record, now + ttl)
        else:
            entry.record = record
            entry.expires = now + ttl
            sessions.move_to_end(key)
        self._drop_expired(now)
        while len(sessions) > self.max_sessions:
            sessions.popitem(last=False)

    async def get_session_and_health(
        self, key: str, ttl: float
    ) -> tuple[SessionRecord | None, HealthSnapshot]:
        return await self.get_session(key, ttl), await self.health_snapshot()

    async def session_count(self) -> int:
        """Live sessions. Exact while all sessions share one TTL (the middleware's case); with
        mixed TTLs an expired session behind a live one at the LRU front is counted until it is
        read or evicted."""
        self._drop_expired(self.clock())
        return len(self._sessions)

    def _drop_expired(self, now: float) -> None:
        sessions = self._sessions
        while sessions:
            key = next(iter(sessions))
            if sessions[key].expires > now:
                return
            del sessions[key]

    # -- the config copy -------------------------------------------------------------------------

    async def get_config(self) -> tuple[bytes, float] | None:
        return self._config

    async def put_config(self, raw: bytes, fetched_at: float) -> None:
        self._config = (bytes(raw), fetched_at)

    async def try_lock(self, name: str, ttl: float) -> str | None:
        now = self.clock()
        held = self._locks.get(name)
        if held is not None and held[1] > now:
            return None
        token = secrets.token_hex(16)
        self._locks[name] = (token, now + ttl)
        return token

    async def unlock(self, name: str, token: str) -> None:
        held = self._locks.get(name)
        if held is not None and held[0] == token:
            del self._locks[name]

    async def hold_lock(self, name: str, token: str, ttl: float) -> bool:
        now = self.clock()
        held = self._locks.get(name)
        if held is None or held[0] != token or held[1] <= now:
            return False
        self._locks[name] = (token, now + ttl)
        return True

    # -- health ---------------------------------------------------------------------------------

    async def health_snapshot(self) -> HealthSnapshot:
        return {key: (failures, until) for key, (failures, until, _) in self._health.items()}

    async def _record_failure(
        self, provider: str, model: str, failure: Failure
    ) -> tuple[int, float]:
        key = (provider, model)
        failures, until, since = self._health.get(key, (0, 0.0, 0.0))
        failures, until, since, _ = backoff_step(
            failures,
            until,
            since,
            failure.config,
            failure.retry_after,
            failure.now,
            failure.started,
            failure.jitter_factor,
        )
        self._health[key] = (failures, until, since)
        return failures, until

    async def record_success(self, provider: str, model: str) -> None:
        self._health.pop((provider, model), None)

    async def try_probe(self, provider: str, model: str, ttl: float) -> bool:
        key = (provider, model)
        now = self.clock()
        expires = self._probes.get(key)
        if expires is not None and expires > now:
            return False
        if len(self._probes) > 1024:  # leases that expired without a release: keep it small
            self._probes = {k: t for k, t in self._probes.items() if t > now}
        self._probes[key] = now + ttl
        return True

    async def release_probe(self, provider: str, model: str) -> None:
        self._probes.pop((provider, model), None)
