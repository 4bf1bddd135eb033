"""State the middleware keeps between requests: sessions, and health when it is fleet-wide.

A shared backend (Redis) must never fail or stall a request: every call is bounded by the
backend's own timeout, an error switches to in-process state for a short cooldown (logged once,
counted), and the backend is tried again by itself after that. Whatever a backend raises, of any
type, is such an error (cancellation is not an Exception, and propagates).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ._health import HealthTracker
from ._router import Selection
from ._stores import MemoryStore, SessionRecord, Store

logger = logging.getLogger("tier_middleware")

OnBackendError = Callable[[str, str], None]


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
    ) -> None:
        self.local = MemoryStore(max_sessions=max_sessions, clock=wall_clock)
        self.store = store  # None: everything in process
        self.health = health
        self.shared_health = shared_health and store is not None
        self.session_ttl = session_ttl
        self.sync_interval = sync_interval
        self.cooldown = cooldown
        self.on_backend_error = on_backend_error
        self.wall_clock = wall_clock
        self._down_until = 0.0  # monotonic; the store is skipped until then
        self._failing = False  # inside a failure streak (logged once)
        self._synced_at = -float("inf")
        # Written in process while the backend failed: reconciled once it answers again.
        self._local_sessions = False
        self._pending_failures: set[tuple[str, str]] = set()

    # -- the backend's availability --------------------------------------------------------------

    def _usable(self) -> Store | None:
        store = self.store
        if store is None or time.monotonic() < self._down_until:
            return None
        return store

    def _failed(self, operation: str, exc: Exception) -> None:
        assert self.store is not None
        self._down_until = time.monotonic() + self.cooldown
        if self.on_backend_error is not None:
            self.on_backend_error(self.store.name, operation)
        if not self._failing:
            self._failing = True
            logger.warning(
                "state backend failing; using in-process state",
                extra={"backend": self.store.name, "operation": operation, "error": str(exc)},
            )

    def _ok(self) -> None:
        if self._failing:
            self._failing = False
            logger.info("state backend answering again", extra={"backend": self.store_name})

    @property
    def store_name(self) -> str:
        return self.store.name if self.store is not None else "memory"

    # -- sessions ----------------------------------------------------------------------------------

    async def load_session(self, key: str) -> SessionRecord | None:
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
                if self._local_sessions:
                    record = await self._newer_local(key, record)
                return record
        return await self.local.get_session(key, self.session_ttl)

    async def _newer_local(self, key: str, record: SessionRecord | None) -> SessionRecord | None:
        """A session moved in process during an outage is newer than the backend's copy: it
        wins (a tier never goes back down) and is written back."""
        local = await self.local.get_session(key, self.session_ttl)
        if local is None or (record is not None and record.updated_at >= local.updated_at):
            return record
        await self.save_session(key, local)
        return local

    async def save_session(self, key: str, record: SessionRecord) -> None:
        store = self._usable()
        if store is not None:
            try:
                await store.put_session(key, record, self.session_ttl)
            except Exception as exc:
                self._failed("put_session", exc)
            else:
                self._ok()
                return
        if self.store is not None:
            self._local_sessions = True
        await self.local.put_session(key, record, self.session_ttl)

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
        now = time.monotonic()
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
