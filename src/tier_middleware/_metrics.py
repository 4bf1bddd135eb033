"""Prometheus metrics: one `Metrics` per (registry, namespace), cheap to record on the hot path.

Starlette builds a middleware stack more than once and tests build many apps in one process, so
`Metrics.for_registry` hands out the same instance for the same registry and namespace instead of
registering the series again (which prometheus-client refuses with "Duplicated timeseries").

Every recording method caches the labelled child in a dict keyed by the label tuple: after the
first call for a label set, recording is one dict lookup and one `inc`/`observe`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import ClassVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, make_asgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from ._router import Selection, TierRouter
from ._types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger("tier_middleware")

# Time to the start of the response, per attempt: from a cached 50 ms answer to a 60 s generation.
DURATION_BUCKETS: tuple[float, ...] = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
    3.0,
    5.0,
    8.0,
    12.0,
    20.0,
    30.0,
    45.0,
    60.0,
)

_HEALTH_DOC = "1 if the model can take a request now, 0 while it is backed off (current at scrape)"
_HEALTH_LABELS = ("provider", "model")


def _full_name(namespace: str, name: str) -> str:
    return f"{namespace}_{name}" if namespace else name


class _HealthCollector:
    """`<ns>_provider_health`, computed when scraped from the routers being watched.

    Holds weak references only: a router that is garbage collected drops out of the next scrape.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._routers: list[weakref.ref[TierRouter]] = []

    def watch(self, router: TierRouter) -> None:
        """Add `router`; watching it again moves it last (the last watched wins on conflict)."""
        with self._lock:
            kept = [r for r in self._routers if (obj := r()) is not None and obj is not router]
            kept.append(weakref.ref(router))
            self._routers = kept

    def routers(self) -> list[TierRouter]:
        """The live routers, oldest first."""
        with self._lock:
            refs = self._routers
            live = [obj for r in refs if (obj := r()) is not None]
            if len(live) != len(refs):
                self._routers = [r for r in refs if r() is not None]
        return live

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self.name, _HEALTH_DOC, labels=_HEALTH_LABELS)]

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.name, _HEALTH_DOC, labels=_HEALTH_LABELS)
        values: dict[tuple[str, str], float] = {}
        for router in self.routers():
            try:
                config = router.config
                health = router.health
                for tier in config.tier_order:
                    for m in config.models(tier):
                        values[m.key] = 1.0 if health.is_available(m.provider, m.model) else 0.0
            except Exception:  # one broken router must not take the whole scrape down
                logger.exception("cannot read the health of a router for metrics")
        for (provider, model), value in values.items():
            family.add_metric([provider, model], value)
        yield family


class Metrics:
    """The package's Prometheus series. Get one with `Metrics.for_registry`."""

    _instances: ClassVar[weakref.WeakKeyDictionary[CollectorRegistry, dict[str, Metrics]]] = (
        weakref.WeakKeyDictionary()
    )
    _instances_lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def for_registry(
        cls, registry: CollectorRegistry | None = None, namespace: str = "llm"
    ) -> Metrics:
        """The `Metrics` of `registry` (default: prometheus_client.REGISTRY) and `namespace`,
        created and registered on the first call, the same object on every later call."""
        if registry is None:
            registry = REGISTRY
        with cls._instances_lock:
            per_registry = cls._instances.get(registry)
            if per_registry is None:
                per_registry = cls._instances[registry] = {}
            metrics = per_registry.get(namespace)
            if metrics is None:
                metrics = per_registry[namespace] = cls(registry, namespace)
            return metrics

    def __init__(self, registry: CollectorRegistry, namespace: str = "llm") -> None:
        """Registers every series in `registry`; use `for_registry` rather than calling this,
        which raises "Duplicated timeseries" the second time for the same registry."""
        self.namespace = namespace
        # Not registered yet: on any failure below, what was registered is unregistered again.
        ns = namespace
        self.tier_requests = Counter(
            "tier_requests", "Requests that asked for a tier", ["tier"], namespace=ns, registry=None
        )
        self.model_selections = Counter(
            "model_selections",
            "Models chosen for a request, retries included",
            ["tier", "provider", "model"],
            namespace=ns,
            registry=None,
        )
        self.provider_failures = Counter(
            "provider_failures",
            "Attempts that failed and counted against the model's health",
            ["provider", "model"],
            namespace=ns,
            registry=None,
        )
        self.model_retries = Counter(
            "model_retries",
            "Requests retried on another model after a failure",
            ["tier", "failed_model", "retry_model"],
            namespace=ns,
            registry=None,
        )
        self.provider_health = _HealthCollector(_full_name(ns, "provider_health"))
        self.tier_unavailable = Counter(
            "tier_unavailable",
            "Requests answered 503 because no model of the tier was available",
            ["tier"],
            namespace=ns,
            registry=None,
        )
        self.request_duration = Histogram(
            "request_duration_seconds",
            "Time from forwarding an attempt to the start of its response",
            ["tier", "provider", "model"],
            namespace=ns,
            registry=None,
            buckets=DURATION_BUCKETS,
        )
        self.session_upgrades = Counter(
            "session_upgrades",
            "Sessions moved to a more capable tier",
            ["from_tier", "to_tier"],
            namespace=ns,
            registry=None,
        )
        self.backend_errors = Counter(
            "backend_errors",
            "Errors from the session or config backend",
            ["backend", "operation"],
            namespace=ns,
            registry=None,
        )
        self.config_refreshes = Counter(
            "config_refreshes",
            "Attempts to refresh the tier configuration, by result",
            ["result"],
            namespace=ns,
            registry=None,
        )
        self.config_info_gauge = Gauge(
            "config_info",
            "The tier configuration in use: 1 for its version",
            ["version"],
            namespace=ns,
            registry=None,
        )
        self.tokens = Counter(
            "tokens",
            "Tokens reported by the provider, by kind (input or output)",
            ["tier", "provider", "model", "kind"],
            namespace=ns,
            registry=None,
        )
        self.cost_usd = Counter(
            "cost_usd",
            "Cost in US dollars from reported tokens and the configured prices",
            ["tier", "provider", "model"],
            namespace=ns,
            registry=None,
        )
        self.retries_over_budget = Counter(
            "retries_over_budget",
            "Retries skipped because the retry budget was spent",
            ["tier"],
            namespace=ns,
            registry=None,
        )
        collectors = (
            self.tier_requests,
            self.model_selections,
            self.provider_failures,
            self.model_retries,
            self.provider_health,
            self.tier_unavailable,
            self.request_duration,
            self.session_upgrades,
            self.backend_errors,
            self.config_refreshes,
            self.config_info_gauge,
            self.tokens,
            self.cost_usd,
            self.retries_over_budget,
        )
        registered = []
        try:
            for collector in collectors:
                registry.register(collector)
                registered.append(collector)
        except BaseException:
            for collector in registered:
                registry.unregister(collector)
            raise

        self._lock = threading.Lock()
        self._config_version: str | None = None
        self._requests: dict[str, Counter] = {}
        self._selections: dict[tuple[str, str, str], Counter] = {}
        self._failures: dict[tuple[str, str], Counter] = {}
        self._retries: dict[tuple[str, str, str], Counter] = {}
        self._unavailable: dict[str, Counter] = {}
        self._durations: dict[tuple[str, str, str], Histogram] = {}
        self._upgrades: dict[tuple[str, str], Counter] = {}
        self._backend_errors: dict[tuple[str, str], Counter] = {}
        self._refreshes: dict[str, Counter] = {}
        self._usage: dict[tuple[str, str, str], tuple[Counter, Counter, Counter]] = {}
        self._over_budget: dict[str, Counter] = {}

    # -- recording (hot path) -----------------------------------------------------------------

    def request(self, tier: str) -> None:
        child = self._requests.get(tier)
        if child is None:
            child = self._requests[tier] = self.tier_requests.labels(tier)
        child.inc()

    def selection(self, sel: Selection) -> None:
        key = (sel.tier, sel.provider, sel.model)
        child = self._selections.get(key)
        if child is None:
            child = self._selections[key] = self.model_selections.labels(*key)
        child.inc()

    def failure(self, sel: Selection) -> None:
        key = (sel.provider, sel.model)
        child = self._failures.get(key)
        if child is None:
            child = self._failures[key] = self.provider_failures.labels(*key)
        child.inc()

    def retry(self, tier: str, failed_model: str, retry_model: str) -> None:
        key = (tier, failed_model, retry_model)
        child = self._retries.get(key)
        if child is None:
            child = self._retries[key] = self.model_retries.labels(*key)
        child.inc()

    def unavailable(self, tier: str) -> None:
        child = self._unavailable.get(tier)
        if child is None:
            child = self._unavailable[tier] = self.tier_unavailable.labels(tier)
        child.inc()

    def duration(self, sel: Selection, seconds: float) -> None:
        key = (sel.tier, sel.provider, sel.model)
        child = self._durations.get(key)
        if child is None:
            child = self._durations[key] = self.request_duration.labels(*key)
        child.observe(seconds)

    def session_upgrade(self, from_tier: str, to_tier: str) -> None:
        key = (from_tier, to_tier)
        child = self._upgrades.get(key)
        if child is None:
            child = self._upgrades[key] = self.session_upgrades.labels(*key)
        child.inc()

    def backend_error(self, backend: str, operation: str) -> None:
        key = (backend, operation)
        child = self._backend_errors.get(key)
        if child is None:
            child = self._backend_errors[key] = self.backend_errors.labels(*key)
        child.inc()

    def config_refresh(self, result: str) -> None:
        child = self._refreshes.get(result)
        if child is None:
            child = self._refreshes[result] = self.config_refreshes.labels(result)
        child.inc()

    def config_info(self, version: str) -> None:
        """Mark `version` as the configuration in use: its series is 1, the previous one's goes."""
        if version == self._config_version:
            return
        with self._lock:
            previous = self._config_version
            if version == previous:
                return
            self.config_info_gauge.labels(version).set(1)
            if previous is not None:
                with contextlib.suppress(KeyError):  # older prometheus-client raise it
                    self.config_info_gauge.remove(previous)
            self._config_version = version

    def usage(self, sel: Selection, input_tokens: int, output_tokens: int) -> None:
        """Add the tokens of one response, and their cost at the prices of `sel.config`."""
        key = (sel.tier, sel.provider, sel.model)
        children = self._usage.get(key)
        if children is None:
            children = self._usage[key] = (
                self.tokens.labels(*key, "input"),
                self.tokens.labels(*key, "output"),
                self.cost_usd.labels(*key),
            )
        input_tokens = max(input_tokens, 0)
        output_tokens = max(output_tokens, 0)
        config = sel.config
        children[0].inc(input_tokens)
        children[1].inc(output_tokens)
        children[2].inc(
            input_tokens * config.input_price_per_million / 1e6
            + output_tokens * config.output_price_per_million / 1e6
        )

    def over_budget(self, tier: str) -> None:
        child = self._over_budget.get(tier)
        if child is None:
            child = self._over_budget[tier] = self.retries_over_budget.labels(tier)
        child.inc()

    def watch(self, router: TierRouter) -> None:
        """Report `router`'s models in `<ns>_provider_health` for as long as the router lives."""
        self.provider_health.watch(router)


def metrics_app(registry: CollectorRegistry | None = None) -> ASGIApp:
    """An ASGI app serving `registry` (default: prometheus_client.REGISTRY) in the Prometheus
    text format, at any path; mount it at /metrics. Lifespan events are acknowledged."""
    serve: ASGIApp = make_asgi_app(registry if registry is not None else REGISTRY)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await serve(scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1000})

    return app


__all__ = ["DURATION_BUCKETS", "Metrics", "metrics_app"]
