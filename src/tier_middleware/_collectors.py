"""The collectors behind `Metrics`: families kept as plain dicts (or computed, for health) and
turned into samples only when scraped, so that recording costs one dict update."""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

from ._router import TierRouter

logger = logging.getLogger("tier_middleware")

_HEALTH_DOC = "1 if the model can take a request now, 0 while it is backed off (current at scrape)"
_HEALTH_LABELS = ("provider", "model")


def full_name(namespace: str, name: str) -> str:
    return f"{namespace}_{name}" if namespace else name


class HealthCollector:
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


class Counters:
    """A counter family kept as a plain dict and turned into samples when scraped.

    prometheus-client's labelled children take a lock and a few calls per increment; requests
    are recorded from the event loop, so a dict update is all the hot path needs. The scrape
    (possibly from another thread) reads a snapshot of the dict.
    """

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.values: dict[tuple[str, ...], float] = {}

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily(self.name, self.documentation, labels=self.labels)]

    def collect(self) -> list[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, value in list(self.values.items()):
            family.add_metric(key, value)
        return [family]


class UsageRow:
    """The tokens and cost of one (tier, provider, model), added to in place."""

    __slots__ = ("cost", "input", "output")

    def __init__(self) -> None:
        self.input = 0.0
        self.output = 0.0
        self.cost = 0.0


class UsageCounters:
    """A counter family read from the `UsageRow` accumulators when scraped: `<ns>_tokens` (a
    series per kind, input then output) or `<ns>_cost_usd`. Recording is attribute additions
    on an accumulator found with one dict lookup."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: tuple[str, ...],
        usage: dict[tuple[str, str, str], UsageRow],
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.usage = usage

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily(self.name, self.documentation, labels=self.labels)]

    def collect(self) -> list[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        rows = list(self.usage.items())
        if self.labels[-1] == "kind":
            for key, row in rows:
                family.add_metric((*key, "input"), row.input)
                family.add_metric((*key, "output"), row.output)
        else:
            for key, row in rows:
                family.add_metric(key, row.cost)
        return [family]


class Histograms:
    """A histogram family: per label set, bucket counts, a sum and a count (recorded by
    `Metrics.duration`)."""

    def __init__(
        self, name: str, documentation: str, labels: tuple[str, ...], buckets: tuple[float, ...]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.bounds = buckets
        # per label set: [count in each bucket (not cumulative) ..., +Inf bucket, sum]
        self.values: dict[tuple[str, ...], list[float]] = {}

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labels)]

    def collect(self) -> list[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        edges = [*(str(float(b)) for b in self.bounds), "+Inf"]
        for key, row in list(self.values.items()):
            row = list(row)
            buckets, total = [], 0.0
            for edge, count in zip(edges, row[:-1], strict=True):
                total += count
                buckets.append((edge, total))
            family.add_metric(list(key), buckets, row[-1])
        return [family]
