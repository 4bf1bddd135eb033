"""Prometheus metrics: one `Metrics` per (registry, namespace), cheap to record on the hot path.

Starlette builds a middleware stack more than once and tests build many apps in one process, so
`Metrics.for_registry` hands out the same instance for the same registry and namespace instead of
registering the series again (which prometheus-client refuses with "Duplicated timeseries").

Counters and the latency histogram are plain dicts keyed by label tuples, exported by collectors
when scraped: recording is one dict update, no lock and no label validation. Token and cost
counts share one accumulator per (tier, provider, model), added to in place.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from bisect import bisect_left
from typing import Any, ClassVar

from prometheus_client import REGISTRY, CollectorRegistry, Gauge, make_asgi_app

from ._asgi import SmallApp
from ._collectors import (
    Counters,
    HealthCollector,
    Histograms,
    UsageCounters,
    UsageRow,
    full_name,
)
from ._router import Selection, TierRouter
from ._types import ASGIApp

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


class Metrics:
    """The package's Prometheus series. Get one with `Metrics.for_registry`."""

    _instances: ClassVar[weakref.WeakKeyDictionary[CollectorRegistry, dict[str, Metrics]]] = (
        weakref.WeakKeyDictionary()
    )
    _instances_lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def for_registry(
        cls,
        registry: CollectorRegistry | None = None,
        namespace: str = "llm",
        *,
        register: bool = True,
    ) -> Metrics:
        """The `Metrics` of `registry` (default: prometheus_client.REGISTRY) and `namespace`,
        created on the first call, the same object on every later call; put on the registry
        unless `register` is False (then `register()` does it, when the time comes)."""
        if registry is None:
            registry = REGISTRY
        with cls._instances_lock:
            per_registry = cls._instances.get(registry)
            if per_registry is None:
                per_registry = cls._instances[registry] = {}
            metrics = per_registry.get(namespace)
            if metrics is None:
                metrics = per_registry[namespace] = cls(registry, namespace)
        if register:
            metrics.register()
        return metrics

    def __init__(self, registry: CollectorRegistry, namespace: str = "llm") -> None:
        """The families, counting from now and shown once `register` has put them on `registry`;
        use `for_registry` rather than calling this: one set per registry and namespace (a
        second set's `register` raises "Duplicated timeseries")."""
        self.namespace = namespace

        def counters(name: str, documentation: str, *labels: str) -> Counters:
            return Counters(full_name(namespace, name), documentation, labels)

        self.tier_requests = counters("tier_requests", "Requests that asked for a tier", "tier")
        self.model_selections = counters(
            "model_selections",
            "Models chosen for a request, retries included",
            "tier",
            "provider",
            "model",
        )
        self.provider_failures = counters(
            "provider_failures",
            "Attempts that failed and counted against the model's health",
            "provider",
            "model",
        )
        self.caller_errors = counters(
            "caller_errors",
            "Attempts judged the caller's fault (a 4xx other than 408 and 429): health unchanged",
            "tier",
            "provider",
            "model",
        )
        self.suspect_requests = counters(
            "suspect_requests",
            "Failed requests whose body had failed on two models: not retried, not counted",
            "tier",
        )
        self.model_retries = counters(
            "model_retries",
            "Requests retried on another model after a failure",
            "tier",
            "failed_model",
            "retry_model",
        )
        self.provider_health = HealthCollector(full_name(namespace, "provider_health"))
        self.tier_unavailable = counters(
            "tier_unavailable",
            "Requests answered 503 because no model of the tier was available",
            "tier",
        )
        self.request_duration = Histograms(
            full_name(namespace, "request_duration_seconds"),
            "Time from forwarding an attempt to the start of its response",
            ("tier", "provider", "model"),
            DURATION_BUCKETS,
        )
        self.session_upgrades = counters(
            "session_upgrades", "Sessions moved to a more capable tier", "from_tier", "to_tier"
        )
        self.backend_errors = counters(
            "backend_errors", "Errors from the session or config backend", "backend", "operation"
        )
        self.config_refreshes = counters(
            "config_refreshes", "Attempts to refresh the tier configuration, by result", "result"
        )
        self.config_info_gauge = Gauge(
            "config_info",
            "The tier configuration in use: 1 for its version",
            ["version"],
            namespace=namespace,
            registry=None,
        )
        # Per (tier, provider, model), in the order they first reported usage: both families.
        self._usage: dict[tuple[str, str, str], UsageRow] = {}
        self.tokens = UsageCounters(
            full_name(namespace, "tokens"),
            "Tokens reported by the provider, by kind (input or output)",
            ("tier", "provider", "model", "kind"),
            self._usage,
        )
        self.cost_usd = UsageCounters(
            full_name(namespace, "cost_usd"),
            "Cost in US dollars from reported tokens and the configured prices",
            ("tier", "provider", "model"),
            self._usage,
        )
        self.retries_over_budget = counters(
            "retries_over_budget", "Retries skipped because the retry budget was spent", "tier"
        )
        self.tracing_errors = counters(
            "tracing_errors", "Errors raised by the tracer, swallowed: the request went on"
        )
        collectors: tuple[Any, ...] = (
            self.tier_requests,
            self.model_selections,
            self.provider_failures,
            self.caller_errors,
            self.suspect_requests,
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
            self.tracing_errors,
        )
        self._registry = weakref.ref(registry)  # the per-registry cache must not keep it alive
        self._collectors = collectors
        self.registered = False  # `register` puts them on the registry, once
        self._lock = threading.Lock()
        self._config_version: str | None = None
        # The dicts behind the hot-path counters, bound once.
        self._requests = self.tier_requests.values
        self._selections = self.model_selections.values
        self._failures = self.provider_failures.values
        self._durations = self.request_duration.values
        self._bounds = self.request_duration.bounds

    def register(self) -> None:
        """Put every family on the registry, once (a middleware does it on its first call,
        so that building one registers nothing). Raises ValueError, with nothing
        registered, when the registry already holds a family of one of these names."""
        with Metrics._instances_lock:
            registry = self._registry()
            if self.registered or registry is None:
                return
            done = []
            try:
                for collector in self._collectors:
                    registry.register(collector)
                    done.append(collector)
            except BaseException:
                for collector in done:
                    registry.unregister(collector)
                raise
            self.registered = True

    # -- recording (hot path) -----------------------------------------------------------------

    @staticmethod
    def _add(values: dict[tuple[str, ...], float], key: tuple[str, ...], amount: float) -> None:
        values[key] = values.get(key, 0.0) + amount

    def request(self, tier: str) -> None:
        key = (tier,)
        self._requests[key] = self._requests.get(key, 0.0) + 1.0

    def selection(self, sel: Selection) -> None:
        key = sel._labels
        self._selections[key] = self._selections.get(key, 0.0) + 1.0

    def failure(self, sel: Selection) -> None:
        self._add(self._failures, (sel.provider, sel.model), 1.0)

    def caller_error(self, sel: Selection) -> None:
        self._add(self.caller_errors.values, sel._labels, 1.0)

    def suspect(self, tier: str) -> None:
        self._add(self.suspect_requests.values, (tier,), 1.0)

    def retry(self, tier: str, failed_model: str, retry_model: str) -> None:
        self._add(self.model_retries.values, (tier, failed_model, retry_model), 1.0)

    def unavailable(self, tier: str) -> None:
        self._add(self.tier_unavailable.values, (tier,), 1.0)

    def duration(self, sel: Selection, seconds: float) -> None:
        row = self._durations.get(sel._labels)
        if row is None:
            row = self._durations[sel._labels] = [0.0] * (len(self._bounds) + 2)
        row[bisect_left(self._bounds, seconds)] += 1
        row[-1] += seconds

    def session_upgrade(self, from_tier: str, to_tier: str) -> None:
        self._add(self.session_upgrades.values, (from_tier, to_tier), 1.0)

    def backend_error(self, backend: str, operation: str) -> None:
        self._add(self.backend_errors.values, (backend, operation), 1.0)

    def config_refresh(self, result: str) -> None:
        self._add(self.config_refreshes.values, (result,), 1.0)

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
        """Add the tokens of one response (a negative count counts as 0), and their cost at the
        prices of `sel.config`. A model's series are created (at 0) the first time it reports."""
        if input_tokens < 0:
            input_tokens = 0
        if output_tokens < 0:
            output_tokens = 0
        row = self._usage.get(sel._labels)
        if row is None:
            row = self._usage[sel._labels] = UsageRow()
        row.input += input_tokens
        row.output += output_tokens
        config = sel.config
        row.cost += (
            input_tokens * config.input_price_per_million
            + output_tokens * config.output_price_per_million
        ) / 1e6

    def over_budget(self, tier: str) -> None:
        self._add(self.retries_over_budget.values, (tier,), 1.0)

    def tracing_error(self) -> None:
        self._add(self.tracing_errors.values, (), 1.0)

    def watch(self, router: TierRouter) -> None:
        """Report `router`'s models in `<ns>_provider_health` for as long as the router lives."""
        self.provider_health.watch(router)


def metrics_app(registry: CollectorRegistry | None = None) -> ASGIApp:
    """An ASGI app serving `registry` (default: prometheus_client.REGISTRY) in the Prometheus
    text format, at any path: `app.add_route("/metrics", metrics_app())`. Lifespan events are
    acknowledged."""
    return SmallApp(make_asgi_app(registry if registry is not None else REGISTRY))


__all__ = ["DURATION_BUCKETS", "Metrics", "metrics_app"]
