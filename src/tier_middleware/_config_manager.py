"""The in-process tier config, kept fresh without touching the hot path.

`ConfigManager` holds the in-process copy (`current`). Requests read only that attribute and call
`tick()`, which costs one clock call and a comparison until a refresh is due; then it starts one
background refresh task. A refresh that fails keeps the last-known-good config (stale-if-error).
With a `Store`, a fleet shares one copy of the config and a lock (`SharedConfig`), so the control
plane is asked about once per refresh period in total rather than once per instance. Whatever the
store raises, of any type, is a store failure: the refresh goes on without it.

Refresh tasks are asyncio tasks: the manager needs an asyncio event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Literal, Self

import httpx

from ._config import StaticConfig, TierConfig
from ._control_plane import ControlPlaneSource, FetchError
from ._shared_config import Copy, SharedConfig, StoreDown
from ._stores.base import Store

logger = logging.getLogger("tier_middleware")

Clock = Callable[[], float]
# Where a config comes from: given in-process (never refreshed) or fetched from a control plane.
ConfigSource = StaticConfig | ControlPlaneSource
RefreshResult = Literal["success", "unchanged", "error", "shared"]
ConfigOrigin = Literal["static", "control_plane", "store", "fallback"]

FAILURE_HOLD = 0.9  # of the retry interval: how long a failed fetch keeps the fleet lock


class ConfigManager:
    """The in-process tier config and its refresh policy. See the module docstring.

    `current` is the config to route with (None until one is known). `on_change(config)` is called
    every time `current` takes a config with different content (the first remote config and an
    adopted fallback included); `on_refresh(result)` once per refresh attempt with "success"
    (fetched, new content), "unchanged" (nothing new), "error" (failed; last-known-good kept) or
    "shared" (adopted the fleet's copy from the store); `on_store_error(backend, operation)` for
    every failed call to the store.
    """

    def __init__(
        self,
        source: ConfigSource,
        *,
        fallback: StaticConfig | None = None,
        store: Store | None = None,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        on_change: Callable[[TierConfig], object] | None = None,
        on_refresh: Callable[[RefreshResult], object] | None = None,
        on_store_error: Callable[[str, str], object] | None = None,
        refresh_ahead: float = 0.8,
        retry_interval: float | None = None,
    ) -> None:
        if not (isinstance(refresh_ahead, int | float) and 0 < refresh_ahead <= 1):
            raise ValueError(f"refresh_ahead must be in (0, 1], got {refresh_ahead!r}")
        self.clock = clock  # monotonic: when a refresh is due (public, so a test can drive it)
        self._wall_clock = wall_clock
        self._on_change = on_change
        self._on_refresh = on_refresh
        self._fallback = TierConfig.load(fallback) if fallback is not None else None

        self.current: TierConfig | None
        self.origin: ConfigOrigin | None
        self._remote: ControlPlaneSource | None
        if isinstance(source, ControlPlaneSource):
            self._remote = source
            self.source_name = source.display_url
            self.current = None
            self.origin = None
            ttl = source.ttl
            self._next_due = -math.inf  # the first tick or ready() fetches
        else:
            self._remote = None
            self.source_name = _static_name(source)
            self.current = TierConfig.load(source)
            self.origin = "static"
            ttl = math.inf
            self._next_due = math.inf  # a static source never refreshes
        if retry_interval is None:
            retry_interval = min(ttl, 30.0)
        if not (
            isinstance(retry_interval, int | float)
            and math.isfinite(retry_interval)
            and retry_interval > 0
        ):
            raise ValueError(f"retry_interval must be a finite number > 0, got {retry_interval!r}")
        self.ttl = ttl
        self.refresh_ahead = float(refresh_ahead)
        self.retry_interval = float(retry_interval)
        self._refresh_after = refresh_ahead * ttl
        timeout = source.timeout if isinstance(source, ControlPlaneSource) else 0.0
        # A fetch holds the fleet lock at most this long; then its copy is there (or it failed).
        lock_ttl = timeout + 1.0
        # Another instance holds the fleet lock: look again after its fetch could have ended.
        self._lock_retry = min(self.retry_interval, lock_ttl)
        self._shared = (
            SharedConfig(store, lock_ttl=lock_ttl, on_error=on_store_error)
            if store is not None
            else None
        )

        self.loaded_at: float | None = None  # wall clock when `current` was fetched
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None
        self._http_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # -- the hot path ----------------------------------------------------------------------------

    def tick(self) -> None:
        """Start a background refresh when one is due; otherwise one clock call and a compare."""
        if self.clock() >= self._next_due:
            self._start()

    # -- waiting for a config ----------------------------------------------------------------------

    # ASYNC109: on timeout this adopts the fallback, which a caller's cancel scope could not do.
    async def ready(self, timeout: float | None = None) -> TierConfig | None:  # noqa: ASYNC109
        """The config, waiting (at most `timeout` seconds) for the in-flight fetch if there is none.

        Starts a fetch unless one failed within `retry_interval` (so a fleet without any config
        does not hammer a broken control plane). When the wait times out with no config, the
        `fallback` config (if any) is adopted; the fetch carries on and replaces it on success.
        """
        if self.current is not None:
            return self.current
        task = self._in_flight()
        if task is None:
            if self._remote is None or self._closed or self.clock() < self._next_due:
                return self.current
            task = self._start()
            assert task is not None
        await asyncio.wait({task}, timeout=timeout)
        if self.current is None and not task.done() and self._fallback is not None:
            logger.info(
                "tier config not received in time; serving the fallback config meanwhile",
                extra={"config_source": self.source_name, "timeout": timeout},
            )
            self._adopt(self._fallback, "fallback", None)
        return self.current

    async def refresh(self) -> None:
        """Refresh now (due or not); concurrent calls share one fetch. Never raises."""
        task = self._start()
        if task is not None:
            await asyncio.wait({task})

    async def wait_idle(self) -> None:
        """Wait until no refresh is in flight (for tests and orderly shutdown)."""
        while (task := self._in_flight()) is not None:
            await asyncio.wait({task})

    @property
    def refreshing(self) -> bool:
        return self._in_flight() is not None

    async def aclose(self) -> None:
        """Cancel a running refresh and close the HTTP client. Idempotent."""
        self._closed = True
        task, self._task = self._task, None
        loop = asyncio.get_running_loop()
        if task is not None and not task.done():
            task.cancel()
            if task.get_loop() is loop:
                await asyncio.wait({task})
        self._next_due = math.inf
        client, self._http = self._http, None
        if client is not None and self._http_loop is loop:
            await client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- task management -----------------------------------------------------------------------

    def _in_flight(self) -> asyncio.Task[None] | None:
        task = self._task
        if task is None or task.done():
            return None
        if task.get_loop() is not asyncio.get_running_loop():
            return None  # left behind by an event loop that is gone (e.g. a test client's)
        return task

    def _start(self) -> asyncio.Task[None] | None:
        if self._remote is None or self._closed:
            return None
        # Re-check after the lock TTL even if the task never reports back (its loop died).
        self._next_due = self.clock() + self._remote.timeout + 1.0
        task = self._in_flight()
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._run(), name="tier-middleware-config-refresh"
            )
            self._task = task
        return task

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._http is None or self._http_loop is not loop:
            assert self._remote is not None
            self._http = httpx.AsyncClient(timeout=self._remote.timeout, follow_redirects=False)
            self._http_loop = loop
        return self._http

    async def _run(self) -> None:
        try:
            result, due_in = await self._refresh_once()
        except asyncio.CancelledError:
            self._next_due = self.clock() + self.retry_interval
            raise
        except Exception:  # a bug must not stop refreshing for good
            logger.exception(
                "tier config refresh crashed", extra={"config_source": self.source_name}
            )
            result, due_in = "error", self.retry_interval
        self._next_due = self.clock() + due_in
        if self._on_refresh is not None:
            try:
                self._on_refresh(result)
            except Exception:
                logger.exception("on_refresh callback failed")

    # -- one refresh ---------------------------------------------------------------------------

    async def _refresh_once(self) -> tuple[RefreshResult, float]:
        """Returns the result and the delay until the next refresh is due."""
        remote = self._remote
        assert remote is not None
        shared = self._shared
        copy: Copy | None = None
        token: str | None = None
        can_put = shared is not None
        if shared is not None:
            try:
                copy = await shared.read()
            except StoreDown:
                shared = None  # it is down: do not pay its timeout twice more
            else:
                shared.ok()
            if copy is not None and (fresh := self._adopt_if_fresh(copy)) is not None:
                return fresh
            if shared is not None:
                # The lock decides who fetches, so the fleet asks about once per retry interval.
                try:
                    token = await shared.lock()
                except StoreDown:
                    can_put = False
                else:
                    if token is None:
                        if copy is not None:
                            self._adopt(copy.config, "store", copy.fetched_at)
                            return "shared", self._lock_retry
                        if self.current is not None:
                            return "unchanged", self._lock_retry
                        # Nothing at all to serve: wait for the holder's copy, or the lock.
                        token, delivered = await shared.await_holder()
                        if delivered is not None:
                            self._adopt(delivered.config, "store", delivered.fetched_at)
                            age = self._age(delivered)
                            return "shared", max(self._refresh_after - age, self._lock_retry)
                        if token is None:
                            return "unchanged", self._lock_retry
            else:
                can_put = False
        failed: FetchError | None = None
        try:
            if token is not None and shared is not None:
                # Another instance may have refreshed between our read and taking the lock.
                try:
                    latest = await shared.read()
                except StoreDown:
                    latest = None
                if latest is not None and (fresh := self._adopt_if_fresh(latest)) is not None:
                    return fresh
            try:
                config, raw = await remote.fetch(self._client())
            except FetchError as exc:
                failed = exc
                self._failed(exc, copy)
                return "error", self.retry_interval
            fetched_at = self._wall_clock()
            if can_put and self._shared is not None:
                await self._shared.put(raw, fetched_at)
        finally:
            if token is not None and self._shared is not None:
                await self._release(self._shared, token, failed)
        changed = self._adopt(config, "control_plane", fetched_at)
        self._recovered()
        return ("success" if changed else "unchanged"), self._refresh_after

    async def _release(self, shared: SharedConfig, token: str, failed: FetchError | None) -> None:
        """Free the lock; after a failure of the control plane, keep it until just before this
        instance's retry is due instead, so that no other instance asks meanwhile (and the next
        fetch may be anyone's: one instance that cannot reach the control plane does not keep
        the fleet from trying). A failure of this instance's own (its key is not set) frees it
        at once: another may well succeed."""
        hold = failed is not None and not (failed.kind == "auth" and failed.status_code is None)
        await shared.release(token, FAILURE_HOLD * self.retry_interval if hold else None)

    def _adopt_if_fresh(self, copy: Copy) -> tuple[RefreshResult, float] | None:
        """Adopt the shared copy if it is fresh; returns the refresh result, or None."""
        age = self._age(copy)
        if age >= self._refresh_after:
            return None
        self._adopt(copy.config, "store", copy.fetched_at)
        self._recovered()
        return "shared", self._refresh_after - age

    def _age(self, copy: Copy) -> float:
        return max(0.0, self._wall_clock() - copy.fetched_at)

    def _adopt(self, config: TierConfig, origin: ConfigOrigin, fetched_at: float | None) -> bool:
        """Make `config` current; returns whether its content changed (and on_change ran)."""
        old = self.current
        self.origin = origin
        self.loaded_at = fetched_at
        if old is not None and old == config:
            return False
        self.current = config
        if old is not None:
            logger.info(
                "tier config changed",
                extra={
                    "config_source": self.source_name,
                    "config_origin": origin,
                    "previous_version": old.version,
                    "config_version": config.version,
                },
            )
        if self._on_change is not None:
            try:
                self._on_change(config)
            except Exception:
                logger.exception("on_change callback failed")
        return True

    def _failed(self, exc: FetchError, copy: Copy | None) -> None:
        self.consecutive_failures += 1
        self.last_error = exc.reason
        if copy is not None and self.origin in (None, "fallback"):
            self._adopt(copy.config, "store", copy.fetched_at)  # a real config beats a default
        if self.current is None and self._fallback is not None:
            self._adopt(self._fallback, "fallback", None)
        fields = {
            "config_source": self.source_name,
            "error": exc.reason,
            "error_kind": exc.kind,
            "status_code": exc.status_code,
            "consecutive_failures": self.consecutive_failures,
            "retry_in": self.retry_interval,
            "config_origin": self.origin,
            "config_version": self.current.version if self.current is not None else None,
        }
        if self.consecutive_failures == 1:
            serving = (
                f"serving {self.origin} config version {self.current.version}"
                if self.current is not None
                else "no tier config available yet"
            )
            logger.warning(
                "tier config refresh from %s failed: %s; %s; retrying every %gs",
                self.source_name,
                exc.reason,
                serving,
                self.retry_interval,
                extra=fields,
            )
        else:
            logger.debug("tier config refresh failed again", extra=fields)

    def _recovered(self) -> None:
        if self.consecutive_failures:
            logger.info(
                "tier config refresh recovered after %d failed attempts",
                self.consecutive_failures,
                extra={
                    "config_source": self.source_name,
                    "previous_failures": self.consecutive_failures,
                    "config_origin": self.origin,
                    "config_version": self.current.version if self.current is not None else None,
                },
            )
        self.consecutive_failures = 0
        self.last_error = None


def _static_name(source: StaticConfig) -> str:
    if isinstance(source, TierConfig):
        return "config"
    if isinstance(source, Mapping):
        return "dict"
    return str(source)


__all__ = ["ConfigManager", "ConfigOrigin", "ConfigSource", "RefreshResult"]
