"""What the middleware keeps between requests: sessions, and health when it is fleet-wide.

With a shared backend, each instance also keeps a bounded local copy of the sessions it read from
or wrote to the backend, so that a session it has served keeps its model while the backend is
unreachable. A session the instance writes only locally during such an outage is reconciled the
first time the backend answers for it again: the backend's record wins, unless the local one is
at a higher tier (a tier never goes down), which is then written back.

A shared backend (Redis) must never fail or stall a request: every call is bounded by the
backend's own timeout, and goes through `Fleet._call`, the one place that decides what a failure
does: it switches to in-process state for a short cooldown (logged once, counted), and the backend
is tried again by itself after that. Whatever a backend raises, of any type, is such a failure
(cancellation is not an Exception, and propagates).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from ._health import HealthConfig, HealthTracker
from ._outage import OnBackendError, Outage
from ._router import Selection
from ._stores import HealthSnapshot, MemoryStore, SessionRecord, Store

T = TypeVar("T")
F = TypeVar("F")


class Fleet:
    """Sessions (with their local copy) and fleet-wide health over an optional shared `store`
    (None: everything in process). `clock` (monotonic) times the cooldown after a backend failure
    and the health sync interval; `wall_clock` stamps what the fleet shares."""

    def __init__(
        self,
        store: Store | None,
        health: HealthTracker,
        *,
        shared_health: bool = False,
        session_ttl: float = 3600.0,
        max_sessions: int = 100_000,
        sync_interval: float = 1.0,
        cooldown: float = 1.0,
        on_backend_error: OnBackendError | None = None,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.local = MemoryStore(max_sessions=max_sessions, clock=wall_clock)
        self.store = store
        self.health = health
        self.shared_health = shared_health and store is not None
        self.session_ttl = session_ttl
        self.max_sessions = max_sessions
        self.sync_interval = sync_interval
        self.cooldown = cooldown
        self.wall_clock = wall_clock
        self.clock = clock
        self.outage = Outage(
            "state backend failing; using in-process state",
            "state backend answering again",
            on_backend_error,
        )
        self._down_until = 0.0  # the store is skipped until then
        self._synced_at = -float("inf")
        # Sessions written in process while the backend failed (key -> when, wall clock), in
        # the order written: each is reconciled the next time the backend answers for it.
        self._written_locally: dict[str, float] = {}
        # Failures counted in process while the backend failed: told to the fleet at the next sync.
        self._pending_failures: set[tuple[str, str]] = set()

    @property
    def written_locally(self) -> tuple[str, ...]:
        """Keys of the sessions written only in process during an outage, oldest first: each is
        reconciled the next time the backend answers for it."""
        return tuple(self._written_locally)

    # -- the one way to call the backend -----------------------------------------------------------

    def _reachable(self) -> bool:
        """Whether there is a backend to call now (not skipped for the cooldown of a failure)."""
        return self.store is not None and self.clock() >= self._down_until

    async def _call(
        self,
        operation: str,
        call: Callable[[Store], Awaitable[T]],
        fallback: F,
        *,
        quiet: bool = False,
    ) -> T | F:
        """What `call` answers with the backend; `fallback` when there is none, when it is skipped
        for the cooldown, or when `call` raises. Any Exception is a failure: it is reported
        (`operation` names it in the log and the metrics), and the backend is skipped for
        `cooldown`. `quiet`: a status read, which neither starts nor ends an outage."""
        store = self.store
        if store is None or self.clock() < self._down_until:
            return fallback
        try:
            answer = await call(store)
        except Exception as exc:
            if not quiet:
                self._down_until = self.clock() + self.cooldown
                self.outage.failed(store.name, operation, exc)
            return fallback
        if self.outage.failing and not quiet:
            self.outage.ok(store.name)
        return answer

    # -- sessions ----------------------------------------------------------------------------------

    async def load_session(self, key: str, ranks: Mapping[str, int]) -> SessionRecord | None:
        """The session's record: the backend's when it answers (reconciled with the local copy,
        `ranks` ordering the tiers), else the local copy."""
        ttl = self.session_ttl
        if self.store is None:
            return await self.local.get_session(key, ttl)  # nothing shared: the copy is all
        sync = self.shared_health and self._reachable() and self._sync_due()
        answer = await self._call("get_session", lambda store: _read(store, key, ttl, sync), None)
        if answer is None:
            return await self.local.get_session(key, ttl)
        record, snapshot = answer
        if snapshot is not None:
            await self._merge(snapshot)
        return await self._reconcile(key, record, ranks)

    async def _reconcile(
        self, key: str, record: SessionRecord | None, ranks: Mapping[str, int]
    ) -> SessionRecord | None:
        """What the backend answered, kept as the local copy; or the local record where the
        backend has none (it lost it, or never got it) or holds a lower tier than one reached
        here during an outage, and then it is written back."""
        local = self.local
        ttl = self.session_ttl
        written = self._written_locally
        outage = bool(written) and written.pop(key, None) is not None
        mine = await local.get_session(key, ttl) if record is None or outage else None
        if mine is not None and (
            record is None or (outage and ranks.get(mine.tier, -1) > ranks.get(record.tier, -1))
        ):
            await self._write(key, mine)
            return mine
        if record is not None:
            await local.put_session(key, record, ttl)
        return record

    async def save_session(self, key: str, record: SessionRecord) -> None:
        if self.store is not None:
            await self._write(key, record)
        await self.local.put_session(key, record, self.session_ttl)

    async def _write(self, key: str, record: SessionRecord) -> None:
        """Write a session to the backend, or remember that it could not be, to reconcile it."""
        ttl = self.session_ttl
        if not await self._call("put_session", lambda store: _put(store, key, record, ttl), False):
            self._wrote_locally(key)

    def _wrote_locally(self, key: str) -> None:
        """Remember a session written only in process, to reconcile it with the backend later.
        Bounded like the local copy: the oldest marks, and those past the session TTL, go."""
        written = self._written_locally
        now = self.wall_clock()
        written.pop(key, None)
        written[key] = now
        horizon = now - self.session_ttl
        while written:
            oldest = next(iter(written))
            if len(written) <= self.max_sessions and written[oldest] > horizon:
                return
            del written[oldest]

    async def session_count(self) -> int | None:
        if self.store is None:
            return await self.local.session_count()
        return await self._call(
            "session_count", lambda store: store.session_count(), None, quiet=True
        )

    # -- fleet-wide health -------------------------------------------------------------------------

    def _sync_due(self) -> bool:
        """Whether this request should read fleet health; claims the sync if so, so that the
        requests arriving while it is in flight do not read it again."""
        now = self.clock()
        if now - self._synced_at < self.sync_interval:
            return False
        self._synced_at = now
        return True

    async def _merge(self, snapshot: HealthSnapshot) -> None:
        if self._pending_failures:
            snapshot = await self._push_pending(snapshot)
        offset = self.health.clock() - self.wall_clock()
        self.health.merge(snapshot, offset, complete=True)

    async def _push_pending(self, snapshot: HealthSnapshot) -> HealthSnapshot:
        """Tell the fleet about failures seen while the backend was unreachable, so that the
        first complete snapshot after an outage does not put those models back in rotation."""
        pending, self._pending_failures = self._pending_failures, set()
        merged = dict(snapshot)
        cfg = self.health.config
        for key in pending:
            remaining = self.health.backoff_remaining(*key)
            if not remaining:
                continue  # over already (or it succeeded since)
            tell = functools.partial(
                _tell, key=key, config=cfg, seconds=remaining, now=self.wall_clock()
            )
            answer = await self._call("record_failure", tell, None)
            if answer is None:
                self._pending_failures |= pending
                break
            merged[key] = answer
        return merged

    async def sync_health(self) -> None:
        """Refresh the local copy of fleet health when it is older than `sync_interval`."""
        if not (self.shared_health and self._reachable() and self._sync_due()):
            return
        snapshot = await self._call("health_snapshot", lambda store: store.health_snapshot(), None)
        if snapshot is not None:
            await self._merge(snapshot)

    async def failure(
        self, sel: Selection, retry_after: float | None, started: float | None = None
    ) -> None:
        """Count a failure against the model of `sel`, whose attempt began at `started` (the
        health clock; None: now)."""
        health = self.health
        health.record_failure(sel.provider, sel.model, retry_after, started=started)
        if not self.shared_health:
            return
        wall = self.wall_clock()
        offset = health.clock() - wall
        began = None if started is None else started - offset

        async def count(store: Store) -> tuple[int, float]:
            cfg = health.config
            # Drawn only when the backend is asked: an outage leaves the tracker's sequence as is.
            jitter = 1.0 + cfg.jitter * (2.0 * health.random() - 1.0) if cfg.jitter else 1.0
            answer = await store.record_failure(
                sel.provider, sel.model, cfg, retry_after, wall, jitter, started=began
            )
            await store.release_probe(sel.provider, sel.model)
            return answer

        answer = await self._call("record_failure", count, None)
        if answer is None:
            self._pending_failures.add(sel.key)  # told to the fleet at the next sync
            return
        health.merge({sel.key: answer}, offset, complete=False)

    async def unconfirmed(
        self, sel: Selection, fingerprint: int, retry_after: float | None, started: float
    ) -> bool:
        """A failure the request never got past: evidence against the model, counted as a
        failure only once failures of enough distinct requests agree. True if it was counted."""
        if self.health.evidence.add(sel.key, fingerprint):
            await self.failure(sel, retry_after, started)
            return True
        await self.release(sel)
        return False

    async def success(self, sel: Selection) -> None:
        health = self.health
        known = health.known(sel.provider, sel.model)
        health.record_success(sel.provider, sel.model)
        if known and self.shared_health:  # else the common case: nothing to tell the fleet
            await self._call("record_success", lambda store: _forget(store, sel), None)

    async def release(self, sel: Selection) -> None:
        probing = self.health.status(sel.provider, sel.model).probes_in_flight > 0
        self.health.release(sel.provider, sel.model)
        if self.shared_health and probing:
            await self._call(
                "release_probe", lambda store: store.release_probe(sel.provider, sel.model), None
            )

    async def probe_lease(self, provider: str, model: str) -> bool:
        """Whether this instance may send the half-open probe (exactly one in the fleet does);
        without the fleet, each instance decides alone."""
        ttl = self.health.config.probe_timeout
        return await self._call(
            "try_probe", lambda store: store.try_probe(provider, model, ttl), True
        )

    async def aclose(self) -> None:
        if self.store is not None:
            await self.store.aclose()


# -- what the calls through `Fleet._call` do, where one is more than a method of the store --------


async def _read(
    store: Store, key: str, ttl: float, with_health: bool
) -> tuple[SessionRecord | None, HealthSnapshot | None]:
    if with_health:
        return await store.get_session_and_health(key, ttl)
    return await store.get_session(key, ttl), None


async def _put(store: Store, key: str, record: SessionRecord, ttl: float) -> bool:
    await store.put_session(key, record, ttl)
    return True  # written (the fallback is False)


async def _tell(
    store: Store, *, key: tuple[str, str], config: HealthConfig, seconds: float, now: float
) -> tuple[int, float]:
    """A failure counted in process during an outage, `seconds` of backoff left. started=0:
    older than any backoff the fleet may have begun meanwhile, so this steps nothing up there;
    it only sets a backoff where none is."""
    provider, model = key
    return await store.record_failure(provider, model, config, seconds, now, started=0.0)


async def _forget(store: Store, sel: Selection) -> None:
    await store.record_success(sel.provider, sel.model)
    await store.release_probe(sel.provider, sel.model)
