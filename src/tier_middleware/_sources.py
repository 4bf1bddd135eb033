"""Where the tier config comes from, and how it is kept fresh without touching the hot path.

`ConfigManager` holds the in-process copy (`current`). Requests read only that attribute and call
`tick()`, which costs one clock call and a comparison until a refresh is due; then it starts one
background refresh task. A refresh that fails keeps the last-known-good config (stale-if-error).
With a `Store`, a fleet shares one copy of the config and a lock, so the control plane is asked
about once per refresh period in total rather than once per instance. Whatever the store raises,
of any type, is a store failure: the refresh goes on without it.

Refresh tasks are asyncio tasks: the manager needs an asyncio event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, NamedTuple, Self
from urllib.parse import urlsplit

import anyio
import httpx
import msgspec

from ._config import ConfigError, StaticConfig, TierConfig
from ._outage import Outage
from ._stores.base import Store

logger = logging.getLogger("tier_middleware")

Clock = Callable[[], float]
RefreshResult = Literal["success", "unchanged", "error", "shared"]
ConfigOrigin = Literal["static", "control_plane", "store", "fallback"]

LOCK_NAME = "config"
FAILURE_HOLD = 0.9  # of the retry interval: how long a failed fetch keeps the fleet lock
MAX_BODY_BYTES = 4 * 1024 * 1024  # a tier table is a few KB; anything this big is not one


class FetchError(Exception):
    """One failed fetch. `reason` is safe to log: it never holds the API key or header values."""

    def __init__(self, reason: str, kind: str, status_code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind  # auth | timeout | connection | status | too_large | not_json | invalid
        self.status_code = status_code


@dataclass(frozen=True, slots=True, repr=False)
class ControlPlaneSource:
    """`GET {url}` (the full URL of `/api/v1/tiers/config`) returns the tier config.

    `api_key_env` names an environment variable read at every fetch and sent as
    `Authorization: Bearer <value>`. `timeout` bounds the whole fetch (connect to last byte);
    `ttl` is how long a fetched config counts as fresh (refreshed ahead of that).
    """

    url: str
    headers: Mapping[str, str] | None = None
    api_key_env: str | None = None
    timeout: float = 2.0
    ttl: float = 1800.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"control plane URL must be an absolute http(s) URL, got {self.display_url!r}"
            )
        for name in ("timeout", "ttl"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.api_key_env is not None and not self.api_key_env:
            raise ValueError("api_key_env must name an environment variable")

    def __repr__(self) -> str:  # no credentials: not the URL's, not the headers
        return (
            f"ControlPlaneSource({self.display_url!r}, api_key_env={self.api_key_env!r}, "
            f"timeout={self.timeout!r}, ttl={self.ttl!r})"
        )

    @property
    def display_url(self) -> str:
        """The URL without credentials, query or fragment: safe for logs and metrics."""
        parts = urlsplit(self.url)
        host = parts.netloc.rpartition("@")[2]
        return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else "<invalid url>"

    async def fetch(self, client: httpx.AsyncClient) -> tuple[TierConfig, bytes]:
        """Fetch and validate the config; returns it with the raw body. Raises FetchError only."""
        headers = {"Accept": "application/json", **(self.headers or {})}
        secrets = [v for v in (self.headers or {}).values() if len(v) >= 4]
        for name, value in (self.headers or {}).items():
            # Checked here, before an HTTP library echoes a bad value (a key read from a file
            # with its newline, say) into an exception message.
            if not (value.isascii() and value.isprintable()):
                raise FetchError(
                    f"control plane header {name!r} does not hold a valid header value "
                    "(printable ASCII)",
                    "auth",
                )
        if self.api_key_env is not None:
            key = os.environ.get(self.api_key_env, "").strip()
            if not key:
                raise FetchError(
                    f"environment variable {self.api_key_env} (api_key_env) is empty or not set",
                    "auth",
                )
            if not key.isascii() or not key.isprintable():
                raise FetchError(
                    f"environment variable {self.api_key_env} (api_key_env) does not hold a "
                    "valid header value",
                    "auth",
                )
            headers["Authorization"] = f"Bearer {key}"
            secrets.append(key)
        try:
            body = await self._get(client, headers)
        except FetchError:
            raise
        except (TimeoutError, httpx.TimeoutException):
            raise FetchError(f"no complete answer within {self.timeout:g}s", "timeout") from None
        except httpx.HTTPError as exc:
            detail = _redact(f"{type(exc).__name__}: {exc}", secrets)
            raise FetchError(detail[:300], "connection") from None
        except (ValueError, UnicodeError) as exc:  # the text may quote a header: leave it out
            raise FetchError(
                f"the request could not be sent ({type(exc).__name__})", "connection"
            ) from None
        try:
            data = msgspec.json.decode(body)
        except (ValueError, RecursionError) as exc:  # msgspec.DecodeError, UnicodeDecodeError
            raise FetchError(
                f"the response is not JSON ({_redact(str(exc), secrets)[:120]})", "not_json"
            ) from None
        try:
            config = TierConfig.from_data(data, source_name=self.display_url)
        except ConfigError as exc:
            raise FetchError(
                f"invalid config: {_redact(str(exc), secrets)[:500]}", "invalid"
            ) from None
        return config, body

    async def _get(self, client: httpx.AsyncClient, headers: dict[str, str]) -> bytes:
        async with (
            asyncio.timeout(self.timeout),
            client.stream("GET", self.url, headers=headers, timeout=self.timeout) as resp,
        ):
            if not 200 <= resp.status_code < 300:
                ctype = resp.headers.get("content-type", "").split(";")[0].strip() or "none"
                raise FetchError(
                    f"HTTP {resp.status_code} (content-type {ctype})",
                    "status",
                    resp.status_code,
                )
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise FetchError(
                        f"the response is larger than {MAX_BODY_BYTES} bytes", "too_large"
                    )
            return bytes(body)


def _redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


class _Copy(NamedTuple):
    config: TierConfig
    fetched_at: float  # wall clock


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
        source: ControlPlaneSource | StaticConfig,
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
        self._clock = clock
        self._wall_clock = wall_clock
        self._store = store
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
        self._lock_ttl = timeout + 1.0
        # Another instance holds the fleet lock: look again after its fetch could have ended.
        self._lock_retry = min(self.retry_interval, self._lock_ttl)

        self.loaded_at: float | None = None  # wall clock when `current` was fetched
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self._store_outage = Outage(
            "store unavailable for the shared tier config; fetching directly",
            "store available again for the shared tier config",
            on_store_error,
        )
        self._task: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None
        self._http_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # -- the hot path ----------------------------------------------------------------------------

    def tick(self) -> None:
        """Start a background refresh when one is due; otherwise one clock call and a compare."""
        if self._clock() >= self._next_due:
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
            if self._remote is None or self._closed or self._clock() < self._next_due:
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
        self._next_due = self._clock() + self._remote.timeout + 1.0
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
            self._next_due = self._clock() + self.retry_interval
            raise
        except Exception:  # a bug must not stop refreshing for good
            logger.exception(
                "tier config refresh crashed", extra={"config_source": self.source_name}
            )
            result, due_in = "error", self.retry_interval
        self._next_due = self._clock() + due_in
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
        store = self._store
        copy: _Copy | None = None
        token: str | None = None
        can_put = store is not None
        if store is not None:
            try:
                copy = self._parse_copy(await store.get_config())
            except Exception as exc:
                self._store_failed("get_config", exc)
                store = None  # it is down: do not pay its timeout twice more
            else:
                self._store_ok()
            if copy is not None:
                age = max(0.0, self._wall_clock() - copy.fetched_at)
                if age < self._refresh_after:
                    self._adopt(copy.config, "store", copy.fetched_at)
                    self._recovered()
                    return "shared", self._refresh_after - age
            if store is not None:
                # The lock decides who fetches: its holder is fetching now, or failed to and
                # keeps it until its retry is due, so the fleet asks once per retry interval.
                try:
                    token = await store.try_lock(LOCK_NAME, ttl=self._lock_ttl)
                except Exception as exc:
                    self._store_failed("try_lock", exc)
                    can_put = False
                else:
                    if token is None:
                        if copy is not None:
                            self._adopt(copy.config, "store", copy.fetched_at)
                            return "shared", self._lock_retry
                        if self.current is not None:
                            return "unchanged", self._lock_retry
                        # Nothing at all to serve: wait for the holder's copy, or the lock.
                        token, shared = await self._await_holder(store)
                        if shared is not None:
                            return shared
                        if token is None:
                            return "unchanged", self._lock_retry
            else:
                can_put = False
        failed: FetchError | None = None
        try:
            if token is not None and store is not None:
                # Another instance may have refreshed between our read and taking the lock.
                shared = await self._fresh_copy(store)
                if shared is not None:
                    return shared
            try:
                config, raw = await remote.fetch(self._client())
            except FetchError as exc:
                failed = exc
                self._failed(exc, copy)
                return "error", self.retry_interval
            fetched_at = self._wall_clock()
            if can_put and self._store is not None:
                try:
                    await self._store.put_config(raw, fetched_at)
                except Exception as exc:
                    self._store_failed("put_config", exc)
        finally:
            if token is not None and self._store is not None:
                await self._release(self._store, token, failed)
        changed = self._adopt(config, "control_plane", fetched_at)
        self._recovered()
        return ("success" if changed else "unchanged"), self._refresh_after

    async def _release(self, store: Store, token: str, failed: FetchError | None) -> None:
        """Free the lock; after a failure of the control plane, keep it until just before this
        instance's retry is due instead, so that no other instance asks meanwhile (and the next
        fetch may be anyone's: one instance that cannot reach the control plane does not keep
        the fleet from trying). A failure of this instance's own (its key is not set) frees it
        at once: another may well succeed."""
        hold = failed is not None and not (failed.kind == "auth" and failed.status_code is None)
        try:
            if hold:
                await store.hold_lock(LOCK_NAME, token, FAILURE_HOLD * self.retry_interval)
            else:
                await store.unlock(LOCK_NAME, token)
        except Exception as exc:
            self._store_failed("hold_lock" if hold else "unlock", exc)

    async def _await_holder(
        self, store: Store
    ) -> tuple[str | None, tuple[RefreshResult, float] | None]:
        """With nothing to serve and the lock held: wait (at most the lock's TTL, real time)
        for the copy its holder stores, or for the lock to be free, rather than ask the control
        plane too. Returns (our lock token, None), (None, the result of adopting a copy), or
        (None, None) when the lock is still held: its holder's fetch failed."""
        pause = 0.05
        with anyio.move_on_after(self._lock_ttl):
            while True:
                await anyio.sleep(pause)
                pause = min(pause * 2, 0.25)
                operation = "get_config"
                try:
                    copy = self._parse_copy(await store.get_config())
                    if copy is None:
                        operation = "try_lock"
                        token = await store.try_lock(LOCK_NAME, self._lock_ttl)
                        if token is not None:
                            return token, None
                except Exception as exc:
                    self._store_failed(operation, exc)
                    return None, None
                if copy is not None:
                    self._adopt(copy.config, "store", copy.fetched_at)
                    age = max(0.0, self._wall_clock() - copy.fetched_at)
                    return None, ("shared", max(self._refresh_after - age, self._lock_retry))
        return None, None

    async def _fresh_copy(self, store: Store) -> tuple[RefreshResult, float] | None:
        """Adopt the shared copy if it is fresh; returns the refresh result, or None."""
        try:
            copy = self._parse_copy(await store.get_config())
        except Exception as exc:
            self._store_failed("get_config", exc)
            return None
        if copy is None:
            return None
        age = max(0.0, self._wall_clock() - copy.fetched_at)
        if age >= self._refresh_after:
            return None
        self._adopt(copy.config, "store", copy.fetched_at)
        self._recovered()
        return "shared", self._refresh_after - age

    def _parse_copy(self, got: tuple[bytes, float] | None) -> _Copy | None:
        if got is None:
            return None
        raw, fetched_at = got
        try:
            data = msgspec.json.decode(raw)
            config = TierConfig.from_data(data, source_name="the store's config copy")
        except (ValueError, RecursionError, ConfigError) as exc:
            logger.debug("ignoring an unusable shared config copy", extra={"error": str(exc)})
            return None
        return _Copy(config, float(fetched_at))

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

    def _failed(self, exc: FetchError, copy: _Copy | None) -> None:
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

    def _store_failed(self, operation: str, exc: Exception) -> None:
        assert self._store is not None
        self._store_outage.failed(self._store.name, operation, exc)

    def _store_ok(self) -> None:
        if self._store_outage.failing and self._store is not None:
            self._store_outage.ok(self._store.name)


def _static_name(source: StaticConfig) -> str:
    if isinstance(source, TierConfig):
        return "config"
    if isinstance(source, Mapping):
        return "dict"
    return str(source)


__all__ = ["ConfigManager", "ControlPlaneSource", "FetchError", "RefreshResult"]
