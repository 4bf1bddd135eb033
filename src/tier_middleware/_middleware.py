"""TierRoutingMiddleware: read the tier, pick a model, rewrite the call, watch how it went.

A request flows top to bottom: route match -> tier extraction -> session -> router -> rewrite ->
app -> outcome (health, retry) -> metrics.
"""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import logging
import math
import os
import random
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from contextvars import ContextVar
from typing import Any

from prometheus_client import CollectorRegistry

from ._body import BodyTooLarge, ClientGone, Payload, TooDeep, parse_object, read_body
from ._budget import RetryBudget
from ._config import ConfigError, TierConfig
from ._errors import TierError, bad_request, service_unavailable
from ._extract import agree, body_tiers, header_tier, invalid_tier
from ._health import HealthConfig, HealthTracker, Key
from ._metrics import Metrics
from ._router import NoHealthyModel, Selection, TierRouter
from ._routes import RoutePolicy, Routes, RouteTable
from ._sessions import Decision, Identity, decide, default_identity, session_key, valid_session_id
from ._sources import ConfigManager, ControlPlaneSource
from ._state import State
from ._status import register_status_source
from ._stores import SessionRecord, store_from_url
from ._types import ASGIApp, Headers, Message, Receive, Scope, Send
from ._usage import JsonUsageTap, UsageTap

logger = logging.getLogger("tier_middleware")

DEFAULT_FAILURE_STATUSES = frozenset({429, 500, 502, 503, 504})
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
_OWN_HEADERS = frozenset({b"x-tier", b"x-tier-provider", b"x-tier-model", b"x-tier-attempts"})
_BODY_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_DISCONNECT: Message = {"type": "http.disconnect"}
_CONFIG_RETRY_AFTER = 5.0  # seconds: a config fetch is retried in the background meanwhile
_LIFESPAN_END = frozenset({"lifespan.shutdown.complete", "lifespan.shutdown.failed"})

StaticConfig = TierConfig | Mapping[str, Any] | str | os.PathLike[str]
Authorize = Callable[[Scope, str], bool | Awaitable[bool]]

_current: ContextVar[Selection | None] = ContextVar("tier_selection", default=None)


def current_selection() -> Selection | None:
    """The model chosen for the request being handled, inside the app; None elsewhere."""
    return _current.get()


class TierRoutingMiddleware:
    """Pure ASGI middleware that routes requests asking for a tier to a concrete model.

    Starlette / FastAPI: ``app.add_middleware(TierRoutingMiddleware, config="tiers.toml",
    routes=["/v1/chat/completions"])``. Django and any other ASGI 3 app:
    ``application = TierRoutingMiddleware(get_asgi_application(), config=..., routes=...)``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        config: StaticConfig | ControlPlaneSource,
        routes: Routes = None,
        fallback: StaticConfig | None = None,
        redis_url: str | None = None,
        redis_options: Mapping[str, Any] | None = None,
        shared_health: bool = False,
        health_sync_interval: float = 1.0,
        session_header: str | None = "x-session-id",
        session_ttl: float = 3600.0,
        max_sessions: int = 100_000,
        identity: Identity | None = None,
        authorize: Authorize | None = None,
        retry_budget: float = 0.2,
        retry_budget_min: int = 3,
        health: HealthConfig | HealthTracker | None = None,
        tier_field: str = "tier",
        tier_header: str = "x-tier",
        model_field: str = "model",
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        failure_statuses: Collection[int] = DEFAULT_FAILURE_STATUSES,
        retry_after_bounds: tuple[int, int] = (1, 60),
        config_timeout: float = 5.0,
        registry: CollectorRegistry | None = None,
        metrics_namespace: str = "llm",
        name: str = "default",
        rng: random.Random | None = None,
    ) -> None:
        self.app = app
        self.name = name
        if not tier_field or not model_field:
            raise ValueError("tier_field and model_field must be non-empty")
        self.tier_field = tier_field
        self.model_field = model_field
        self.tier_header = tier_header.lower().encode("latin-1")
        self.session_header = session_header.lower().encode("latin-1") if session_header else None
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be >= 1")
        self.max_body_bytes = max_body_bytes
        self.failure_statuses = frozenset(failure_statuses)
        low, high = retry_after_bounds
        if not 0 <= low <= high:
            raise ValueError("retry_after_bounds must be (low, high) with 0 <= low <= high")
        self.retry_after_bounds = (low, high)
        if session_ttl <= 0:
            raise ValueError("session_ttl must be > 0")
        self.config_timeout = config_timeout
        self.identity = identity or default_identity
        self.authorize = authorize
        self.budget = RetryBudget(retry_budget, retry_budget_min)
        # Request headers the app must not see from the client: ours are set by the middleware.
        self.request_drop = _OWN_HEADERS | {self.tier_header}
        self.request_drop_rewritten = self.request_drop | _BODY_FRAMING
        self.routes = RouteTable(routes)
        self.metrics = Metrics.for_registry(registry, metrics_namespace)

        tracker = health if isinstance(health, HealthTracker) else HealthTracker(health, rng=rng)
        self.health = tracker
        self._rng = rng
        store = store_from_url(redis_url, **dict(redis_options or {})) if redis_url else None
        self.state = State(
            store,
            tracker,
            shared_health=shared_health,
            session_ttl=session_ttl,
            max_sessions=max_sessions,
            sync_interval=health_sync_interval,
            on_backend_error=self.metrics.backend_error,
        )
        self.router: TierRouter | None = None
        self.config_error: ConfigError | None = None
        self._config_error_reported = False
        try:
            self.configs = ConfigManager(
                config,
                fallback=fallback,
                store=store,
                on_change=self._adopt,
                on_refresh=self.metrics.config_refresh,
            )
            if self.configs.current is not None:
                self._adopt(self.configs.current, startup=True)
        except ConfigError as exc:
            # Built outside an event loop (at import, as Django's asgi.py does): raise, and the
            # server fails to load the app. Built inside one (Starlette's lazy middleware stack,
            # in the lifespan scope): uvicorn would take a raise for "lifespan unsupported" and
            # serve 500s, so the error fails lifespan startup instead, and requests get a 503.
            # Such an instance does nothing else: no config manager, no status-page entry.
            if not _inside_event_loop():
                raise
            self.config_error = exc
            return
        register_status_source(self)

    # -- configuration -----------------------------------------------------------------------------

    def _adopt(self, config: TierConfig, startup: bool = False) -> None:
        """Route with a new config; health of the models that remain is kept."""
        for policy in self.routes.policies():
            try:
                policy.check_against(config)
            except ConfigError:
                if startup:
                    raise
                logger.warning(
                    "route policy names a tier the new config lacks",
                    extra={"version": config.version},
                )
        if self.router is None:
            lease = self.state.probe_lease if self.state.shared_health else None
            self.router = TierRouter(config, self.health, rng=self._rng, probe_lease=lease)
            self.metrics.watch(self.router)
        else:
            self.router.config = config
        self.metrics.config_info(config.version)
        if not startup:
            logger.info("tier config adopted", extra={"version": config.version})

    @property
    def config(self) -> TierConfig | None:
        """The config in force now (None until a control plane first answered)."""
        return self.router.config if self.router is not None else None

    @property
    def config_source_name(self) -> str:
        return self.configs.source_name

    async def session_count(self) -> int | None:
        return await self.state.session_count()

    async def aclose(self) -> None:
        """Close what the middleware opened (HTTP client, Redis pool); lifespan shutdown does it."""
        await self.configs.aclose()
        await self.state.aclose()

    # -- ASGI ----------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":
            if kind == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        if self.config_error is not None:
            await self._config_unavailable(send)
            return
        policy = self.routes.match(scope["path"])
        if policy is None:
            await self.app(scope, receive, send)
            return
        self.configs.tick()
        await _Exchange(self, scope, receive, send, policy).run()

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.config_error is not None:
            # The server refuses to start (uvicorn logs the message and exits with status 3).
            if (await receive())["type"] == "lifespan.startup":
                self._config_error_reported = True
                await send({"type": "lifespan.startup.failed", "message": str(self.config_error)})
            return

        async def send_then_close(message: Message) -> None:
            if message["type"] in _LIFESPAN_END:
                await self.aclose()
            await send(message)

        # An app without lifespan support (Django) raises here; the server handles that.
        await self.app(scope, receive, send_then_close)

    async def _config_unavailable(self, send: Send) -> None:
        """The answer to every request when the config could not be loaded and the server
        started anyway (no lifespan startup): a 503, and the reason in the log once."""
        if not self._config_error_reported:
            self._config_error_reported = True
            logger.error("tier config unavailable: %s", self.config_error)
        await service_unavailable(
            "config_unavailable",
            "the tier configuration could not be loaded; the server log says why",
            _CONFIG_RETRY_AFTER,
            self.retry_after_bounds,
        ).send(send)


def _inside_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


class _Exchange:
    """One routed request: what was read from the client, and each attempt at the app."""

    __slots__ = (
        "attempts",
        "body",
        "buffered",
        "complete",
        "disconnected",
        "headers",
        "mw",
        "named",
        "payload",
        "policy",
        "receive",
        "retries",
        "scope",
        "send",
        "session_raw",
        "tier",
        "tried",
    )

    def __init__(
        self,
        mw: TierRoutingMiddleware,
        scope: Scope,
        receive: Receive,
        send: Send,
        policy: RoutePolicy,
    ) -> None:
        self.mw = mw
        self.scope = scope
        self.receive = receive
        self.send = send
        self.policy = policy
        self.buffered: list[bytes] | None = None  # what was read from `receive`, None if nothing
        self.complete = True  # whether `buffered` is the whole body
        self.body = b""
        self.payload: Payload | None = None  # set when the body is rewritten
        self.disconnected = False
        self.headers: Headers = scope["headers"]
        # The request headers by name, when every name is lowercase and appears once (what
        # servers send); None otherwise, and the headers are then read one by one.
        self.named: dict[bytes, bytes] | None = None
        self.attempts = 0
        self.tier = ""
        self.session_raw: bytes | None = None
        self.retries = 0  # retry-budget slots held
        self.tried: list[Key] = []

    async def run(self) -> None:
        mw = self.mw
        try:
            tier = await self._read_tier()
            if tier is None:
                await mw.app(self.scope, self._replaying(), self.send)
                return
            router = mw.router or await self._first_config()
            if tier not in router.ranks or self.policy.allowed_tiers is not None:
                tier = self._check_tier(tier, router)
            self.tier = tier
            if mw.authorize is not None:
                await self._authorize(tier)
            decision: Decision | None = None
            key = ""
            try:
                if self.session_raw is None and router.probe_lease is None:
                    selection = router.select_now(tier)  # the common case: nothing to await
                else:
                    key, decision, selection = await self._select(router)
            except NoHealthyModel as exc:
                await self._unavailable(exc)
                return
            mw.metrics.request(self.tier)
            if decision is not None and decision.upgraded_from is not None:
                mw.metrics.session_upgrade(decision.upgraded_from, self.tier)
            served = await self._call_app(selection)
            if decision is not None and served is not None:
                await self._save_session(key, decision, served)
        except TierError as err:
            await err.send(self.send)
        except ClientGone:
            return  # nobody is left to answer, and the app need not spend a model call

    # -- reading the request ------------------------------------------------------------------

    def _scan_headers(
        self, found: list[tuple[str, str]]
    ) -> tuple[bytes | None, bytes | None, bool]:
        """(content-type, content-length, chunked) of the request; a tier header goes into
        `found`, the session header into `session_raw`."""
        mw = self.mw
        headers = self.headers
        named = self.named = _by_name(headers)
        if named is not None:
            tier_raw = named.get(mw.tier_header)
            if tier_raw is not None:
                found.append(("header", header_tier(tier_raw)))
            if mw.session_header is not None:
                self.session_raw = named.get(mw.session_header)
            return (
                named.get(b"content-type"),
                named.get(b"content-length"),
                b"transfer-encoding" in named,
            )
        content_type = length = None
        chunked = False
        for raw_name, value in headers:
            name = raw_name.lower()
            if name == mw.tier_header:
                found.append(("header", header_tier(value)))
            elif name == b"content-type":
                content_type = value
            elif name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = True
            elif name == mw.session_header:
                self.session_raw = value
        return content_type, length, chunked

    async def _read_tier(self) -> str | None:
        """The tier the request names (normalised, not yet checked against the config), the
        route's default, or None for a request that is not ours."""
        mw = self.mw
        found: list[tuple[str, str]] = []
        content_type, length, chunked = self._scan_headers(found)
        # An explicitly opted-in route is a JSON LLM endpoint: bad bodies are rejected. With
        # routes=None only a request that names a tier is ours; anything else goes on untouched.
        strict = mw.routes.explicit or bool(found)
        declared = _content_length(length)
        if content_type is not None and _is_json(content_type):
            if declared is not None and declared > mw.max_body_bytes:
                if strict:
                    raise _too_large(mw.max_body_bytes)
                return None
            first = await self.receive()
            if not self._hold_whole(first, strict):
                await self._buffer(first, strict)
            if not self.complete:
                return None
            if self.body:
                payload = parse_object(self.body)
                if payload is None:
                    if strict:
                        raise bad_request("invalid_json", "the request body must be a JSON object")
                    return None
                self.payload = payload
                found += body_tiers(payload, mw.tier_field, mw.model_field)
        elif not strict:
            return None
        elif (declared is not None and declared <= mw.max_body_bytes) or (
            declared is None and not chunked
        ):
            # Not JSON but small enough to hold: keep it so a failed call can be replayed.
            first = await self.receive()
            if not self._hold_whole(first, strict):
                await self._buffer(first, strict)
        tier = found[0][1] if len(found) == 1 else agree(found)
        if tier is None:
            tier = self.policy.default_tier
            if tier is None and self.policy.require_tier:
                raise bad_request("tier_required", "this route requires a tier", param="tier")
        return tier

    def _check_tier(self, tier: str, router: TierRouter) -> str:
        config = router.config
        if tier not in config.ranks:
            raise invalid_tier(
                f"unknown tier {tier!r}; valid tiers: {', '.join(config.tier_order)}"
            )
        allowed = self.policy.allowed_tiers
        if allowed is not None and tier not in allowed:
            raise TierError(
                403,
                "tier_not_allowed",
                f"tier {tier!r} is not allowed on this route; allowed: "
                f"{', '.join(t for t in config.tier_order if t in allowed)}",
                param="tier",
            )
        return tier

    async def _authorize(self, tier: str) -> None:
        authorize = self.mw.authorize
        if authorize is None:
            return
        allowed = authorize(self.scope, tier)
        if inspect.isawaitable(allowed):
            allowed = await allowed
        if not allowed:
            raise TierError(
                403, "tier_not_allowed", f"this caller may not use tier {tier!r}", param="tier"
            )

    async def _first_config(self) -> TierRouter:
        """Wait (up to `config_timeout`) for a first config from the control plane."""
        mw = self.mw
        if mw.router is None:
            await mw.configs.ready(mw.config_timeout)
            if mw.router is None:
                raise service_unavailable(
                    "config_unavailable",
                    "no tier configuration is available yet",
                    _CONFIG_RETRY_AFTER,
                    mw.retry_after_bounds,
                )
        return mw.router

    def _hold_whole(self, first: Message, strict: bool) -> bool:
        """Hold a body that came whole in its first message (the common case, with no await);
        False when more is to come and `_buffer` must read it."""
        if first["type"] != "http.request" or first.get("more_body", False):
            return False
        body = first.get("body", b"")
        self.buffered = [body]
        if len(body) > self.mw.max_body_bytes:
            if strict:
                raise _too_large(self.mw.max_body_bytes)
        else:
            self.body = body
        return True

    async def _buffer(self, first: Message, strict: bool) -> None:
        """Hold the body whose first message is `first` and that goes on, up to the cap."""
        limit = self.mw.max_body_bytes
        if first["type"] == "http.disconnect":
            self.disconnected = True
        try:
            self.body = await read_body(self._then_live(first), limit)
        except BodyTooLarge as exc:
            if strict:
                raise _too_large(limit) from None
            self.buffered = exc.chunks
            self.complete = exc.complete
            return
        self.buffered = [self.body]

    async def _receive_live(self) -> Message:
        # The server sends http.disconnect once; every later caller must see it too.
        if self.disconnected:
            return _DISCONNECT
        message = await self.receive()
        if message["type"] == "http.disconnect":
            self.disconnected = True
        return message

    def _replaying(self) -> Receive:
        """`receive` for an unrouted request: what was read first, then the live stream."""
        if self.buffered is None:
            return self.receive
        body = b"".join(self.buffered)
        return self._then_live(
            {"type": "http.request", "body": body, "more_body": not self.complete}
        )

    def _then_live(self, message: Message) -> Receive:
        """A `receive` that hands out `message` once, then the live stream."""
        pending = [message]

        async def receive() -> Message:
            return pending.pop() if pending else await self._receive_live()

        return receive

    # -- choosing and calling -----------------------------------------------------------------

    async def _select(self, router: TierRouter) -> tuple[str, Decision | None, Selection]:
        """Select with a session (sticky, never down a tier) or with a fleet-wide probe lease:
        (session key, session decision, selection)."""
        mw = self.mw
        state = mw.state
        if self.session_raw is not None and mw.session_header is not None:
            session_id = valid_session_id(self.session_raw)
            if session_id is None:
                raise bad_request(
                    "invalid_session_id",
                    "the session id must be 1-128 characters of A-Z, a-z, 0-9, '.', '_', ':' "
                    "or '-'",
                    param="session_id",
                )
            key = session_key(mw.identity(self.scope), session_id)
            record = await state.load_session(key)
            decision = await decide(router, record, self.tier, time.time())
            selection = decision.selection
            if selection.tier != self.tier:  # a session never goes down a tier
                self.tier = selection.tier
                await self._authorize(self.tier)
            return key, decision, selection
        if router.probe_lease is None:
            return "", None, router.select_now(self.tier)
        await state.sync_health()
        return "", None, await router.select(self.tier)

    async def _unavailable(self, exc: NoHealthyModel) -> None:
        """The 503 short-circuit: no model of the tier can take the request now."""
        mw = self.mw
        mw.metrics.request(self.tier)
        mw.metrics.unavailable(self.tier)
        await service_unavailable(
            "service_unavailable",
            f"all models for tier {exc.tier!r} are temporarily unavailable",
            exc.retry_after,
            mw.retry_after_bounds,
        ).send(self.send, [(b"x-tier", self.tier.encode()), (b"x-tier-attempts", b"0")])

    async def _call_app(self, selection: Selection) -> Selection | None:
        """Call the app with `selection`, and again with another model while a failure may be
        retried. Returns the selection that served the request, None when it failed."""
        mw = self.mw
        metrics = mw.metrics
        base_headers = self._base_headers()
        # A body that was not held (a large upload, say) cannot be sent twice.
        max_attempts = self.policy.max_attempts if self.buffered is not None else 1
        budget = mw.budget
        budget.active += 1
        try:
            while True:
                self.attempts += 1
                self.tried.append(selection.key)
                attempt = _Attempt(self, selection, self.attempts < max_attempts)
                try:
                    scope = attempt.scope(base_headers)
                except TooDeep:
                    await attempt.release()
                    raise bad_request(
                        "invalid_json", "the request body is nested too deeply"
                    ) from None
                metrics.selection(selection)
                token = _current.set(selection)
                attempt.started_at = time.perf_counter()
                try:
                    await mw.app(scope, attempt.receive, attempt.send)
                except Exception:
                    # Unless the failure was recorded and its response dropped already:
                    if attempt.next is None:
                        if self.disconnected:
                            await attempt.release()
                            raise
                        if not attempt.failed:  # raising, even after a good start, is failing
                            await attempt.fail(None)
                        if attempt.started or not attempt.can_retry:
                            raise
                        attempt.next = await self.alternative()
                        if attempt.next is None:
                            raise
                except BaseException:  # cancellation: nothing learned about the model
                    await attempt.release()
                    raise
                else:
                    if not attempt.recorded:
                        await attempt.release()  # the app answered nothing, or the client left
                    tap = attempt.tap
                    if tap is not None:
                        usage = tap.result()
                        if usage is not None:
                            metrics.usage(selection, *usage)
                finally:
                    _current.reset(token)
                retry = attempt.next
                if retry is None:
                    return None if attempt.failed else selection
                metrics.retry(self.tier, selection.model, retry.model)
                selection = retry
        finally:
            budget.active -= 1
            for _ in range(self.retries):
                budget.done()

    async def _save_session(self, key: str, decision: Decision, served: Selection) -> None:
        """Store the session when it was created or upgraded, or moved to another model."""
        if decision.record is None and served is decision.selection:
            return
        now = time.time()
        created = decision.record.created_at if decision.record is not None else now
        record = SessionRecord(served.provider, served.model, served.tier, created, now)
        await self.mw.state.save_session(key, record)

    def _base_headers(self) -> Headers:
        """The request headers the app gets: without ours and the tier header, and for a
        rewritten body without its framing (each attempt adds a fresh content-length)."""
        mw = self.mw
        drop = mw.request_drop_rewritten if self.payload is not None else mw.request_drop
        headers = self.headers
        named = self.named
        if named is None:
            return [(k, v) for k, v in headers if k.lower() not in drop]
        present = drop.intersection(named)
        if len(present) == 1:  # typically content-length: cut it out without a Python loop
            (name,) = present
            kept = list(headers)
            del kept[list(named).index(name)]
            return kept
        return [h for h in headers if h[0] not in drop] if present else list(headers)

    async def alternative(self) -> Selection | None:
        """Another model to retry with, if the client is still there, the retry budget has room
        and the tier has a healthy model left."""
        mw = self.mw
        if self.disconnected:
            return None
        if not mw.budget.try_retry():
            mw.metrics.over_budget(self.tier)
            return None
        try:
            chosen = await mw.router.select(self.tier, exclude=self.tried)  # type: ignore[union-attr]
        except NoHealthyModel:
            mw.budget.done()
            return None
        self.retries += 1
        return chosen


# `x-tier-attempts` values, encoded once.
_ATTEMPTS = tuple((b"x-tier-attempts", str(n).encode()) for n in range(16))


class _Attempt:
    """One call of the app with one model: its `receive` and `send`, which decide at response
    start whether the response goes out or is dropped for a retry."""

    __slots__ = (
        "can_retry",
        "exchange",
        "failed",
        "next",
        "pending",
        "recorded",
        "selection",
        "started",
        "started_at",
        "tap",
    )

    def __init__(self, exchange: _Exchange, selection: Selection, can_retry: bool) -> None:
        self.exchange = exchange
        self.selection = selection
        self.can_retry = can_retry
        self.pending = True  # the body has not been handed to the app yet
        self.started = False  # a response start went to the client
        self.recorded = False  # health already knows this attempt's outcome
        self.failed = False  # ... and it was a failure
        self.next: Selection | None = None  # set when this response is dropped for a retry
        self.tap: UsageTap | None = None
        self.started_at = 0.0

    def scope(self, base_headers: Headers) -> Scope:
        """The scope the app gets: rewritten body's length, the choice in headers and state."""
        ex = self.exchange
        sel = self.selection
        headers = base_headers.copy()
        if ex.payload is not None:
            mw = ex.mw
            ex.body = ex.payload.rewrite(mw.tier_field, mw.model_field, sel.model)
            headers.append((b"content-length", str(len(ex.body)).encode()))
        headers += sel.headers
        # scope["state"] is shared by reference: each attempt gets its own copy.
        state = ex.scope.get("state")
        return {
            **ex.scope,
            "headers": headers,
            "state": {**state, "tier_selection": sel} if state else {"tier_selection": sel},
        }

    async def fail(self, retry_after: float | None) -> None:
        self.recorded = self.failed = True
        mw = self.exchange.mw
        mw.metrics.failure(self.selection)
        await mw.state.failure(self.selection, retry_after)

    async def release(self) -> None:
        if not self.recorded:
            self.recorded = True
            await self.exchange.mw.state.release(self.selection)

    async def receive(self) -> Message:
        ex = self.exchange
        if self.pending and ex.buffered is not None:
            self.pending = False
            return {"type": "http.request", "body": ex.body, "more_body": False}
        return await ex._receive_live()

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            start = await self._start(message)
            if start is None:
                return  # dropped: this attempt's failure is retried on another model
            message = start
        elif self.next is not None:
            return  # draining a response that will be retried
        elif self.tap is not None and message["type"] == "http.response.body":
            self.tap.feed(message.get("body", b""))
        try:
            await self.exchange.send(message)
        except Exception:
            # The server's send fails once the client has gone (ASGI 2.4: OSError): whatever
            # the app makes of that, it is no provider failure.
            self.exchange.disconnected = True
            raise

    async def _start(self, message: Message) -> Message | None:
        """Record the outcome the status tells; the response start to send, with our headers,
        or None when the response is dropped for a retry."""
        ex = self.exchange
        sel = self.selection
        mw = ex.mw
        status = message["status"]
        headers = message.get("headers") or ()
        mw.metrics.duration(sel, time.perf_counter() - self.started_at)
        if status in mw.failure_statuses:
            await self.fail(_retry_after(headers))
            if self.can_retry:
                self.next = await ex.alternative()
                if self.next is not None:
                    return None
        elif status < 400:
            self.recorded = True
            if mw.state.shared_health:
                await mw.state.success(sel)
            else:
                mw.health.record_success(sel.provider, sel.model)
        else:  # the caller's fault: says nothing about the model
            await self.release()
        out, content_type, encoding = _response_headers(headers)
        out += sel.headers
        attempts = ex.attempts
        out.append(
            _ATTEMPTS[attempts]
            if attempts < len(_ATTEMPTS)
            else (b"x-tier-attempts", str(attempts).encode())
        )
        if content_type is not None and 200 <= status < 300:
            self.tap = (
                JsonUsageTap()  # by far the most common
                if content_type == b"application/json" and encoding is None
                else UsageTap.for_content_type(status, content_type, encoding)
            )
        self.started = True
        return {**message, "headers": out}


def _by_name(headers: Any) -> dict[bytes, bytes] | None:
    """ASGI headers as a dict when every name is lowercase bytes and appears once (what servers
    and frameworks send), so the common case needs no Python loop; None otherwise."""
    if type(headers) is not list and type(headers) is not tuple:
        return None
    try:
        named = dict(headers)
        if len(named) == len(headers) and b"".join(named).islower():
            return named
    except (TypeError, ValueError):
        pass
    return None


def _response_headers(headers: Any) -> tuple[Headers, bytes | None, bytes | None]:
    """The app's response headers without any of ours, its content-type and content-encoding."""
    named = _by_name(headers)
    if named is not None and _OWN_HEADERS.isdisjoint(named):  # what frameworks send
        return list(headers), named.get(b"content-type"), named.get(b"content-encoding")
    out: Headers = []
    content_type = encoding = None
    for name, value in headers:
        lowered = name.lower()
        if lowered in _OWN_HEADERS:
            continue
        if lowered == b"content-type":
            content_type = value
        elif lowered == b"content-encoding":
            encoding = value
        out.append((name, value))
    return out, content_type, encoding


def _content_length(value: bytes | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _too_large(limit: int) -> TierError:
    return TierError(
        413, "request_too_large", f"the request body exceeds the limit of {limit} bytes"
    )


def _retry_after(headers: Any) -> float | None:
    """A failure response's own Retry-After (`retry-after-ms` first), in seconds."""
    seconds = None
    for name, value in headers:
        name = name.lower()
        if name == b"retry-after-ms":
            try:
                return float(value) / 1000.0
            except ValueError:
                continue
        if name == b"retry-after":
            text = value.decode("latin-1").strip()
            try:
                seconds = float(text)
            except ValueError:
                try:
                    when = email.utils.parsedate_to_datetime(text)
                    seconds = when.timestamp() - time.time()
                except (TypeError, ValueError):
                    continue
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        return None
    return seconds
