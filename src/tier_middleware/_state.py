"""State the middleware keeps between requests: sessions, and health when it is fleet-wide.

With a shared backend, each instance also keeps a bounded local copy of the sessions it read from
or wrote to the backend, so that a session it has served keeps its model while the backend is
unreachable. A session the instance writes only locally during such an outage is reconciled the
first time the backend answers for it again: the backend's record wins, unless the local one is
at a higher tier (a tier never goes down), which is then written back.

A shared backend (Redis) must never fail or stall a request: every call is bounded by the
backend's own timeout, an error switches to in-process state for a short cooldown (logged once,
counted), and the backend is tried again by itself after that. Whatever a backend raises, of any
type, is such an error (cancellation is not an Exception, and propagates).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from ._health import HealthTracker
from ._outage import OnBackendError, Outage
from ._router import Selection
from ._stores import MemoryStore, SessionRecord, Store

logger = logging.getLogger("tier_middleware")


class State:
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
        self.store = store  # None: everything in process
        self.health = health
        self.shared_health = shared_health and store is not None
        self.session_ttl = session_ttl
        self.sync_interval = sync_interval
        self.cooldown = cooldown
        self.wall_clock = wall_clock
        self.clock = clock  # monotonic: the cooldown and the sync interval
        self._down_until = 0.0  # the store is skipped until then
        self.outage = Outage(
            "state backend failing; using in-process state",
            "state backend answering again",
            on_backend_error,
        )
        self._synced_at = -float("inf")
        # Sessions written in process while the backend failed (key -> when, wall clock), in
        # the order written: each is reconciled the next time the backend answers for it.
        self._written_locally: dict[str, float] = {}
        self.max_sessions = max_sessions
        self._pending_failures: set[tuple[str, str]] = set()

    # -- the backend's availability --------------------------------------------------------------

    def _usable(self) -> Store | None:
        store = self.store
        if store is None or self.clock() < self._down_until:
            return None
        return store

    def _failed(self, operation: str, exc: Exception) -> None:
        assert self.store is not None
        self._down_until = self.clock() + self.cooldown
        self.outage.failed(self.store.name, operation, exc)

    def _ok(self) -> None:
        if self.outage.failing:
            self.outage.ok(self.store_name)

    @property
    def store_name(self) -> str:
        return self.store.name if self.store is not None else "memory"

    # -- sessions ----------------------------------------------------------------------------------

    async def load_session(self, key: str, ranks: Mapping[str, int]) -> SessionRecord | None:
        """The session's record: the backend's when it answers (reconciled with the local copy,
        `ranks` ordering the tiers), else the local copy."""
        store = self._usable()
        if store is not None:
            try:
                if self.shared_health and self._sync_due():
                    record, snapshot = await store.get_session_and_health(key, self.session_ttl)
                    await self._merge(store, snapshot)
                else:
                    record = await store.get_session(key, self.session_ttl)
            except Exception as exc:
                self._failed("get_session", exc)
            else:
                self._ok()
                return await self._reconcile(store, key, record, ranks)
        return await self.local.get_session(key, self.session_ttl)

    async def _reconcile(
        self, store: Store, key: str, record: SessionRecord | None, ranks: Mapping[str, int]
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
            try:
                await store.put_session(key, mine, ttl)
            except Exception as exc:
                self._failed("put_session", exc)
                self._wrote_locally(key)
            return mine
        if record is not None:
            await local.put_session(key, record, ttl)
        return record

    async def save_session(self, key: str, record: SessionRecord) -> None:
        store = self._usable()
        if store is not None:
            try:
                await store.put_session(key, record, self.session_ttl)
            except Exception as exc:
                self._failed("put_session", exc)
            else:
                self._ok()
                await self.local.put_session(key, record, self.session_ttl)
                return
        if self.store is not None:
            self._wrote_locally(key)
        await self.local.put_session(key, record, self.session_ttl)

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
        try:
            return await self.store.session_count()
        except Exception:
            return None

    # -- fleet-wide health -----------------------------------------------------------------------

    def _sync_due(self) -> bool:
        """Whether this request should read fleet health; claims the sync if so, so that the
        requests arriving while it is in flight do not read it again."""
        now = self.clock()
        if now - self._synced_at < self.sync_interval:
            return False
        self._synced_at = now
        return True

    async def _merge(
        self, store: Store, snapshot: dict[tuple[str, str], tuple[int, float]]
    ) -> None:
        if self._pending_failures:
            snapshot = await self._push_pending(store, snapshot)
        offset = self.health.clock() - self.wall_clock()
        self.health.merge(snapshot, offset, complete=True)

    async def _push_pending(
        self, store: Store, snapshot: dict[tuple[str, str], tuple[int, float]]
    ) -> dict[tuple[str, str], tuple[int, float]]:
        """Tell the fleet about failures seen while the backend was unreachable, so that the
        first complete snapshot after an outage does not put those models back in rotation."""
        pending, self._pending_failures = self._pending_failures, set()
        merged = dict(snapshot)
        cfg = self.health.config
        for provider, model in pending:
            remaining = self.health.backoff_remaining(provider, model)
            if not remaining:
                continue  # over already (or it succeeded since)
            try:
                # started=0: older than any backoff the fleet may have begun meanwhile, so
                # this steps nothing up there; it only sets a backoff where none is.
                merged[(provider, model)] = await store.record_failure(
                    provider, model, cfg, remaining, self.wall_clock(), started=0.0
                )
            except Exception as exc:
                self._pending_failures |= pending
                self._failed("record_failure", exc)
                break
        return merged

    async def sync_health(self) -> None:
        """Refresh the local copy of fleet health when it is older than `sync_interval`."""
        if not self.shared_health:
            return
        store = self._usable()
        if store is None or not self._sync_due():
            return
        try:
            snapshot = await store.health_snapshot()
        except Exception as exc:
            self._failed("health_snapshot", exc)
        else:
            self._ok()
            await self._merge(store, snapshot)

    async def failure(
        self, sel: Selection, retry_after: float | None, started: float | None = None
    ) -> None:
        """Count a failure against the model of `sel`, whose attempt began at `started` (the
        health clock; None: now)."""
        health = self.health
        health.record_failure(sel.provider, sel.model, retry_after, started=started)
        if not self.shared_health:
            return
        store = self._usable()
        if store is None:
            self._pending_failures.add(sel.key)
            return
        cfg = health.config
        jitter = 1.0 + cfg.jitter * (2.0 * health.random() - 1.0) if cfg.jitter else 1.0
        wall = self.wall_clock()
        offset = health.clock() - wall
        try:
            failures, until = await store.record_failure(
                sel.provider,
                sel.model,
                cfg,
                retry_after,
                wall,
                jitter,
                started=None if started is None else started - offset,
            )
            await store.release_probe(sel.provider, sel.model)
        except Exception as exc:
            self._pending_failures.add(sel.key)
            self._failed("record_failure", exc)
            return
        self._ok()
        health.merge({sel.key: (failures, until)}, offset, complete=False)

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
        if not known or not self.shared_health:
            return  # the common case: a healthy model answered, nothing to tell the fleet
        store = self._usable()
        if store is None:
            return
        try:
            await store.record_success(sel.provider, sel.model)
            await store.release_probe(sel.provider, sel.model)
        except Exception as exc:
            self._failed("record_success", exc)

    async def release(self, sel: Selection) -> None:
        probing = self.health.status(sel.provider, sel.model).probes_in_flight > 0
        self.health.release(sel.provider, sel.model)
        store = self._usable() if self.shared_health and probing else None
        if store is None:
            return
        try:
            await store.release_probe(sel.provider, sel.model)
        except Exception as exc:
            self._failed("release_probe", exc)

    async def probe_lease(self, provider: str, model: str) -> bool:
        """Whether this instance may send the half-open probe (exactly one in the fleet does)."""
        store = self._usable()
        if store is None:
            return True  # without the fleet, each instance decides alone
        try:
            return await store.try_probe(provider, model, self.health.config.probe_timeout)
        except Exception as exc:
            self._failed("try_probe", exc)
            return True

    async def aclose(self) -> None:
        if self.store is not None:
            await self.store.aclose()
