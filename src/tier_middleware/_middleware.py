"""TierRoutingMiddleware: the stateless shell. It holds the options, adopts configs, answers
lifespan, and hands each routed request to an `Exchange` (`_exchange.py`), which reads it
(`_request.py`), calls the app once or twice (`_attempt.py`) and judges the outcome
(`_attribution.py`).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import random
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from ._asgi import close_unread
from ._attempt import current_selection
from ._budget import RetryBudget
from ._config import ConfigError, StaticConfig, TierConfig
from ._config_manager import ConfigManager, ConfigSource
from ._control_plane import ControlPlaneSource
from ._errors import config_unavailable
from ._exchange import Exchange
from ._fleet import Fleet
from ._health import HealthConfig, HealthTracker
from ._metrics import Metrics
from ._options import RequestLimits, RetryConfig, SessionConfig, grouped
from ._request import BODY_FRAMING, OWN_HEADERS
from ._router import TierRouter
from ._routes import Routes, RouteTable
from ._sessions import default_identity
from ._status import register_status_source
from ._stores import store_from_url
from ._timeouts import Deadlines
from ._tracing import TracedExchange, tracer_for
from ._types import ASGIApp, Authorize, Message, Receive, Scope, Send

logger = logging.getLogger("tier_middleware")

_LIFESPAN_END = frozenset({"lifespan.shutdown.complete", "lifespan.shutdown.failed"})


__all__ = ["TierRoutingMiddleware", "current_selection"]


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
        config: ConfigSource,
        routes: Routes = None,
        fallback: StaticConfig | None = None,
        redis_url: str | None = None,
        redis_options: Mapping[str, Any] | None = None,
        shared_health: bool = False,
        health_sync_interval: float = 1.0,
        health: HealthConfig | HealthTracker | None = None,
        sessions: SessionConfig | None = None,
        retries: RetryConfig | None = None,
        limits: RequestLimits | None = None,
        authorize: Authorize | None = None,
        tier_field: str = "tier",
        tier_header: str = "x-tier",
        model_field: str = "model",
        config_timeout: float = 5.0,
        registry: CollectorRegistry | None = None,
        metrics_namespace: str = "llm",
        name: str = "default",
        rng: random.Random | None = None,
        tracer_provider: Any = None,
        **deprecated: Any,
    ) -> None:
        sessions, retries, limits = grouped(sessions, retries, limits, deprecated)
        self.app = app
        self.name = name
        if not tier_field or not model_field:
            raise ValueError("tier_field and model_field must be non-empty")
        self.sessions = sessions
        self.retries = retries
        self.limits = limits
        # Read on every routed request: kept flat, as the request path uses them.
        self.tier_field = tier_field
        self.model_field = model_field
        self.tier_header = tier_header.lower().encode("latin-1")
        header = sessions.header
        self.session_header = header.lower().encode("latin-1") if header else None
        self.max_body_bytes = limits.max_body_bytes
        self.body_timeout = limits.body_timeout
        self.body_deadlines = Deadlines(self.body_timeout) if self.body_timeout else None
        self.failure_statuses = frozenset(retries.failure_statuses)
        self.retry_after_bounds = retries.retry_after_bounds
        self.config_timeout = config_timeout
        # How long an attempt may take to start its response (a stream, to its first byte).
        self.attempt_timeout = retries.attempt_timeout
        self.timeouts = Deadlines(self.attempt_timeout) if self.attempt_timeout else None
        self.identity = sessions.identity or default_identity
        self.authorize = authorize
        self.authorize_in_thread = authorize is not None and not _is_async_callable(authorize)
        self.budget = RetryBudget(retries.budget, retries.budget_min)
        # Request headers the app must not see from the client: ours are set by the middleware.
        self.request_drop = OWN_HEADERS | {self.tier_header}
        self.request_drop_rewritten = self.request_drop | BODY_FRAMING
        self.request_drop_rare = self.request_drop_rewritten - {b"content-length"}
        self.routes = RouteTable(routes)
        # Registered on the first call: building a middleware registers nothing.
        self.metrics = Metrics.for_registry(registry, metrics_namespace, register=False)
        # OpenTelemetry (`_tracing.py`): without a provider to record to, a plain Exchange.
        self.tracer_provider = tracer_provider
        self.tracer: Any = None
        self.exchange_type: type[Exchange] = Exchange
        self._find_tracer()

        tracker = health if isinstance(health, HealthTracker) else HealthTracker(health, rng=rng)
        self.health = tracker
        self._rng = rng
        store = store_from_url(redis_url, **dict(redis_options or {})) if redis_url else None
        self.state = Fleet(
            store,
            tracker,
            shared_health=shared_health,
            session_ttl=sessions.ttl,
            max_sessions=sessions.max_sessions,
            sync_interval=health_sync_interval,
            on_backend_error=self.metrics.backend_error,
        )
        self.router: TierRouter | None = None
        self.config_error: ConfigError | None = None
        self.listed = True  # on the status page, or never to be (a config error)
        self.refreshing = isinstance(config, ControlPlaneSource)  # else nothing to tick
        self._config_error_reported = False
        try:
            self.configs = ConfigManager(
                config,
                fallback=fallback,
                store=store,
                on_change=self._adopt,
                on_refresh=self.metrics.config_refresh,
                on_store_error=self.metrics.backend_error,
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
        # On the status page from its first call (lifespan or request): building one is pure.
        self.listed = False

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

    def _find_tracer(self) -> None:
        """Trace with `tracer_provider`, else with the global one if one is set now (looked up at
        construction, and again once lifespan startup completes: a provider set in a lifespan
        handler counts). A provider that raises leaves tracing off."""
        try:
            tracer = tracer_for(self.tracer_provider)
        except ValueError:
            raise  # tracer_provider= without opentelemetry-api installed
        except Exception:
            self.metrics.tracing_error()
            tracer = None
        self.tracer = tracer
        self.exchange_type = Exchange if tracer is None else TracedExchange

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
        if self.config_error is None:  # else no config manager was made
            await self.configs.aclose()
        await self.state.aclose()
        for deadlines in (self.timeouts, self.body_deadlines):
            if deadlines is not None:
                await deadlines.aclose()

    def _first_call(self) -> None:
        """What building the middleware leaves to its first call (lifespan or request): the
        status page lists it, and its metric families go on the registry."""
        self.listed = True
        register_status_source(self)
        try:
            self.metrics.register()
        except ValueError as exc:  # a family of the same name is there already: count anyway
            logger.error("tier metrics not registered: %s", exc)

    # -- ASGI ----------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.listed:
            self._first_call()
        kind = scope["type"]
        if kind != "http":
            if kind == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        if self.config_error is not None:
            await self._config_unavailable(scope, send)
            return
        policy = self.routes.match(scope["path"])
        if policy is None:
            await self.app(scope, receive, send)
            return
        if self.refreshing:
            self.configs.tick()
        await self.exchange_type(self, scope, receive, send, policy).run()

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
            elif message["type"] == "lifespan.startup.complete" and self.tracer_provider is None:
                self._find_tracer()
            await send(message)

        # An app without lifespan support (Django) raises here; the server handles that.
        await self.app(scope, receive, send_then_close)

    async def _config_unavailable(self, scope: Scope, send: Send) -> None:
        """The answer to every request when the config could not be loaded and the server
        started anyway (no lifespan startup): a 503, and the reason in the log once."""
        if not self._config_error_reported:
            self._config_error_reported = True
            logger.error("tier config unavailable: %s", self.config_error)
        error = config_unavailable(
            "the tier configuration could not be loaded; the server log says why",
            self.retry_after_bounds,
        )
        await error.send(send, close_unread(scope, whole=False))


def _is_async_callable(fn: object) -> bool:
    """An `async def` function, or a partial of one, or an object whose `__call__` is one."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def _inside_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
