"""Metrics: recorded through the methods, exposed with generate_latest and parsed back.

Every test uses its own CollectorRegistry; values are read from the parsed exposition text.
"""

from __future__ import annotations

import gc
import math
import weakref
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from _clock import FakeClock
from samples import scrape, series, value
from tier_middleware import (
    HealthConfig,
    HealthTracker,
    ModelConfig,
    Selection,
    TierConfig,
    TierRouter,
    status_app,
)
from tier_middleware._metrics import DURATION_BUCKETS, Metrics, metrics_app


def family_names(registry: CollectorRegistry) -> set[str]:
    text = generate_latest(registry).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def model(
    provider: str, name: str, cost: int = 1, input_price: float = 0.0, output_price: float = 0.0
) -> ModelConfig:
    return ModelConfig(
        provider=provider,
        model=name,
        relative_cost=cost,
        input_price_per_million=input_price,
        output_price_per_million=output_price,
    )


def selection(
    tier: str, provider: str, name: str, input_price: float = 0.0, output_price: float = 0.0
) -> Selection:
    return Selection(tier, provider, name, model(provider, name, 1, input_price, output_price))


def config(**tiers: list[ModelConfig]) -> TierConfig:
    return TierConfig(tiers={k: tuple(v) for k, v in tiers.items()}, tier_order=tuple(tiers))


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- one instance per (registry, namespace) -------------------------------------------------------


def test_for_registry_is_idempotent(registry: CollectorRegistry) -> None:
    first = Metrics.for_registry(registry)
    second = Metrics.for_registry(registry)
    assert first is second
    assert Metrics.for_registry(registry, "llm") is first
    assert Metrics.for_registry(registry, "other") is not first
    assert Metrics.for_registry(CollectorRegistry()) is not first
    first.request("simple")
    second.request("simple")
    assert value(scrape(registry), "llm_tier_requests_total", tier="simple") == 2.0


def test_default_registry_is_the_global_one() -> None:
    assert Metrics.for_registry() is Metrics.for_registry(REGISTRY)
    assert Metrics.for_registry(None, "llm") is Metrics.for_registry(REGISTRY, "llm")


def test_constructing_twice_is_what_for_registry_avoids(registry: CollectorRegistry) -> None:
    Metrics.for_registry(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Metrics(registry).register()


def test_a_failed_registration_is_rolled_back(registry: CollectorRegistry) -> None:
    # A series registered by someone else clashes part way through: nothing is left behind.
    clash = Counter("llm_tokens", "someone else's", registry=registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Metrics.for_registry(registry)
    registry.unregister(clash)
    metrics = Metrics.for_registry(registry)
    metrics.request("simple")
    assert value(scrape(registry), "llm_tier_requests_total", tier="simple") == 1.0


def test_the_cache_does_not_keep_a_registry_alive() -> None:
    registry = CollectorRegistry()
    Metrics.for_registry(registry).request("simple")
    ref = weakref.ref(registry)
    del registry
    gc.collect()
    assert ref() is None


def test_sentinel_names(registry: CollectorRegistry) -> None:
    metrics = Metrics.for_registry(registry, namespace="sentinel")
    sel = selection("simple", "openai", "gpt-4o-mini")
    metrics.request("simple")
    metrics.selection(sel)
    metrics.failure(sel)
    metrics.retry("simple", "gpt-4o-mini", "claude-haiku")
    router = TierRouter(config(simple=[model("openai", "gpt-4o-mini")]))  # watched weakly: keep it
    metrics.watch(router)
    names = family_names(registry)
    for name in (
        "sentinel_tier_requests_total",
        "sentinel_model_selections_total",
        "sentinel_provider_failures_total",
        "sentinel_model_retries_total",
        "sentinel_provider_health",
    ):
        assert name in names
    samples = scrape(registry)
    assert value(samples, "sentinel_tier_requests_total", tier="simple") == 1.0
    assert (
        value(
            samples,
            "sentinel_model_selections_total",
            tier="simple",
            provider="openai",
            model="gpt-4o-mini",
        )
        == 1.0
    )
    assert (
        value(samples, "sentinel_provider_failures_total", provider="openai", model="gpt-4o-mini")
        == 1.0
    )
    assert (
        value(
            samples,
            "sentinel_model_retries_total",
            tier="simple",
            failed_model="gpt-4o-mini",
            retry_model="claude-haiku",
        )
        == 1.0
    )
    assert value(samples, "sentinel_provider_health", provider="openai", model="gpt-4o-mini") == 1.0
    assert not any(n.startswith("llm_") for n in names)


def test_every_series_name(registry: CollectorRegistry) -> None:
    metrics = Metrics.for_registry(registry)
    sel = selection("simple", "openai", "gpt-4o-mini")
    metrics.request("simple")
    metrics.selection(sel)
    metrics.failure(sel)
    metrics.retry("simple", "a", "b")
    metrics.unavailable("simple")
    metrics.duration(sel, 0.3)
    metrics.session_upgrade("simple", "complex")
    metrics.backend_error("redis", "get")
    metrics.config_refresh("ok")
    metrics.config_info("v1")
    metrics.usage(sel, 1, 1)
    metrics.over_budget("simple")
    router = TierRouter(config(simple=[model("openai", "gpt-4o-mini")]))
    metrics.watch(router)
    assert {
        "llm_tier_requests_total",
        "llm_model_selections_total",
        "llm_provider_failures_total",
        "llm_model_retries_total",
        "llm_provider_health",
        "llm_tier_unavailable_total",
        "llm_request_duration_seconds_bucket",
        "llm_request_duration_seconds_count",
        "llm_request_duration_seconds_sum",
        "llm_session_upgrades_total",
        "llm_backend_errors_total",
        "llm_config_refreshes_total",
        "llm_config_info",
        "llm_tokens_total",
        "llm_cost_usd_total",
        "llm_retries_over_budget_total",
    } <= family_names(registry)


# -- counters and the histogram --------------------------------------------------------------------


def test_counters_count(registry: CollectorRegistry) -> None:
    metrics = Metrics.for_registry(registry)
    a = selection("simple", "openai", "gpt-4o-mini")
    b = selection("complex", "anthropic", "claude-sonnet")
    for _ in range(3):
        metrics.request("simple")
    metrics.request("complex")
    metrics.selection(a)
    metrics.selection(a)
    metrics.selection(b)
    metrics.failure(a)
    metrics.failure(selection("moderate", "openai", "gpt-4o-mini"))  # same provider/model
    metrics.retry("simple", "gpt-4o-mini", "claude-haiku")
    metrics.unavailable("complex")
    metrics.unavailable("complex")
    metrics.session_upgrade("simple", "complex")
    metrics.backend_error("redis", "get")
    metrics.backend_error("redis", "get")
    metrics.backend_error("redis", "set")
    metrics.config_refresh("ok")
    metrics.config_refresh("ok")
    metrics.config_refresh("error")
    metrics.over_budget("simple")
    s = scrape(registry)
    assert value(s, "llm_tier_requests_total", tier="simple") == 3.0
    assert value(s, "llm_tier_requests_total", tier="complex") == 1.0
    assert (
        value(
            s, "llm_model_selections_total", tier="simple", provider="openai", model="gpt-4o-mini"
        )
        == 2.0
    )
    assert (
        value(
            s,
            "llm_model_selections_total",
            tier="complex",
            provider="anthropic",
            model="claude-sonnet",
        )
        == 1.0
    )
    assert value(s, "llm_provider_failures_total", provider="openai", model="gpt-4o-mini") == 2.0
    assert series(s, "llm_model_retries_total") == {
        frozenset(
            {("tier", "simple"), ("failed_model", "gpt-4o-mini"), ("retry_model", "claude-haiku")}
        ): 1.0
    }
    assert series(s, "llm_tier_unavailable_total") == {frozenset({("tier", "complex")}): 2.0}
    assert value(s, "llm_session_upgrades_total", from_tier="simple", to_tier="complex") == 1.0
    assert value(s, "llm_backend_errors_total", backend="redis", operation="get") == 2.0
    assert value(s, "llm_backend_errors_total", backend="redis", operation="set") == 1.0
    assert value(s, "llm_config_refreshes_total", result="ok") == 2.0
    assert value(s, "llm_config_refreshes_total", result="error") == 1.0
    assert series(s, "llm_retries_over_budget_total") == {frozenset({("tier", "simple")}): 1.0}


def test_duration_histogram(registry: CollectorRegistry) -> None:
    metrics = Metrics.for_registry(registry)
    sel = selection("simple", "openai", "gpt-4o-mini")
    for seconds in (0.01, 0.3, 0.3, 4.0, 90.0):
        metrics.duration(sel, seconds)
    s = scrape(registry)
    labels = {"tier": "simple", "provider": "openai", "model": "gpt-4o-mini"}
    assert value(s, "llm_request_duration_seconds_count", **labels) == 5.0
    assert value(s, "llm_request_duration_seconds_sum", **labels) == pytest.approx(94.61)
    buckets = {
        float(dict(k)["le"]): v for k, v in series(s, "llm_request_duration_seconds_bucket").items()
    }
    assert sorted(buckets) == sorted([*DURATION_BUCKETS, math.inf])
    assert DURATION_BUCKETS[0] == 0.05
    assert DURATION_BUCKETS[-1] == 60.0
    assert buckets[0.05] == 1.0
    assert buckets[0.5] == 3.0
    assert buckets[5.0] == 4.0
    assert buckets[60.0] == 4.0
    assert buckets[math.inf] == 5.0


def test_recording_keeps_one_series_per_label_set(registry: CollectorRegistry) -> None:
    metrics = Metrics.for_registry(registry)
    sel = selection("simple", "openai", "gpt-4o-mini")
    for _ in range(3):
        metrics.selection(sel)
    samples = [
        s
        for f in registry.collect()
        if f.name == "llm_model_selections"
        for s in f.samples
        if s.name == "llm_model_selections_total"
    ]
    assert [(s.labels, s.value) for s in samples] == [
        ({"tier": "simple", "provider": "openai", "model": "gpt-4o-mini"}, 3.0)
    ]


# -- usage and cost -------------------------------------------------------------------------------


def test_tokens_and_cost(registry: CollectorRegistry) -> None:
    metrics = Metrics.for_registry(registry)
    sel = selection(
        "complex",
        "anthropic",
        "claude-sonnet",
        input_price=3.0,
        output_price=15.0,
    )
    metrics.usage(sel, 1_000, 200)  # 0.003 + 0.003
    metrics.usage(sel, 2_000_000, 1_000_000)  # 6 + 15
    s = scrape(registry)
    labels = {"tier": "complex", "provider": "anthropic", "model": "claude-sonnet"}
    assert value(s, "llm_tokens_total", kind="input", **labels) == 2_001_000.0
    assert value(s, "llm_tokens_total", kind="output", **labels) == 1_000_200.0
    assert value(s, "llm_cost_usd_total", **labels) == pytest.approx(21.006)


def test_cost_uses_the_prices_of_the_selection_at_hand(registry: CollectorRegistry) -> None:
    # A config reload can change prices under the same labels: each call uses its own.
    metrics = Metrics.for_registry(registry)
    old = selection("simple", "openai", "gpt-4o-mini", input_price=1.0)
    new = selection("simple", "openai", "gpt-4o-mini", input_price=2.0)
    metrics.usage(old, 1_000_000, 0)
    metrics.usage(new, 1_000_000, 0)
    s = scrape(registry)
    labels = {"tier": "simple", "provider": "openai", "model": "gpt-4o-mini"}
    assert value(s, "llm_cost_usd_total", **labels) == pytest.approx(3.0)


def test_free_models_cost_nothing_and_negative_counts_are_ignored(
    registry: CollectorRegistry,
) -> None:
    metrics = Metrics.for_registry(registry)
    sel = selection("simple", "local", "llama")
    metrics.usage(sel, 500, 50)
    metrics.usage(sel, -10, -1)
    s = scrape(registry)
    labels = {"tier": "simple", "provider": "local", "model": "llama"}
    assert value(s, "llm_tokens_total", kind="input", **labels) == 500.0
    assert value(s, "llm_tokens_total", kind="output", **labels) == 50.0
    assert value(s, "llm_cost_usd_total", **labels) == 0.0


# Recording goes through accumulators; the exposition must be what one plain dict per family
# (keyed by label tuples, in first-recorded order) gives: names, labels, order and values.

SELECTIONS = [
    selection("simple", "openai", "gpt-4o-mini", 0.15, 0.6),
    selection("simple", "anthropic", "claude-haiku", 0.8, 4.0),
    selection("complex", "openai", "gpt-4o-mini", 0.15, 0.6),
    selection("simple", "openai", "gpt-4o-mini", 0.3, 1.2),  # the same labels, new prices
    selection("complex", "local", "llama"),
]
calls = st.lists(
    st.tuples(
        st.sampled_from(["usage", "duration", "selection"]),
        st.integers(0, len(SELECTIONS) - 1),
        st.integers(-5, 3_000_000) | st.sampled_from([0, 1 << 40]),
        st.integers(-5, 100_000),
        st.floats(0, 100) | st.sampled_from(DURATION_BUCKETS),
    ),
    max_size=60,
)


class Reference:
    """The families as plain dicts, recorded the straightforward way."""

    def __init__(self) -> None:
        self.tokens: dict[tuple[str, ...], float] = {}
        self.cost: dict[tuple[str, ...], float] = {}
        self.selections: dict[tuple[str, ...], float] = {}
        self.durations: dict[tuple[str, ...], list[float]] = {}

    def record(self, call: str, sel: Selection, a: int, b: int, seconds: float) -> None:
        labels = (sel.tier, sel.provider, sel.model)
        if call == "usage":
            a, b = max(a, 0), max(b, 0)
            for kind, n in (("input", a), ("output", b)):
                key = (*labels, kind)
                self.tokens[key] = self.tokens.get(key, 0.0) + n
            price = a * sel.config.input_price_per_million
            price += b * sel.config.output_price_per_million
            self.cost[labels] = self.cost.get(labels, 0.0) + price / 1e6
        elif call == "duration":
            row = self.durations.setdefault(labels, [0.0] * (len(DURATION_BUCKETS) + 2))
            row[sum(1 for bound in DURATION_BUCKETS if bound < seconds)] += 1
            row[-1] += seconds
        else:
            self.selections[labels] = self.selections.get(labels, 0.0) + 1.0

    def collect(self) -> list[Any]:
        tokens = CounterMetricFamily("llm_tokens", "", labels=("tier", "provider", "model", "kind"))
        for key, count in self.tokens.items():
            tokens.add_metric(key, count)
        cost = CounterMetricFamily("llm_cost_usd", "", labels=("tier", "provider", "model"))
        for key, usd in self.cost.items():
            cost.add_metric(key, usd)
        chosen = CounterMetricFamily(
            "llm_model_selections", "", labels=("tier", "provider", "model")
        )
        for key, count in self.selections.items():
            chosen.add_metric(key, count)
        durations = HistogramMetricFamily(
            "llm_request_duration_seconds", "", labels=("tier", "provider", "model")
        )
        for key, row in self.durations.items():
            edges = [*(str(b) for b in DURATION_BUCKETS), "+Inf"]
            cumulative = [sum(row[: i + 1]) for i in range(len(edges))]
            durations.add_metric(list(key), list(zip(edges, cumulative, strict=True)), row[-1])
        return [tokens, cost, chosen, durations]


def samples_of(families: Any, names: set[str]) -> dict[str, list[Any]]:
    """The samples of the named families, in order, by family."""
    return {
        f.name: [(s.name, s.labels, s.value) for s in f.samples]
        for f in families
        if f.name in names
    }


@settings(max_examples=150, deadline=None)
@given(calls=calls)
def test_exposition_is_that_of_plain_dicts(calls: list[tuple[str, int, int, int, float]]) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.register()
    reference = Reference()
    for call, index, a, b, seconds in calls:
        sel = SELECTIONS[index]
        reference.record(call, sel, a, b, seconds)
        if call == "usage":
            metrics.usage(sel, a, b)
        elif call == "duration":
            metrics.duration(sel, seconds)
        else:
            metrics.selection(sel)
    names = {"llm_tokens", "llm_cost_usd", "llm_model_selections", "llm_request_duration_seconds"}
    assert samples_of(registry.collect(), names) == samples_of(reference.collect(), names)
    # And the text: the same lines, in the same order, family by family.
    expected = CollectorRegistry()
    expected.register(Fixed(reference.collect()))
    for name in names:
        assert lines_of(registry, name) == lines_of(expected, name)


class Fixed:
    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> list[Any]:
        return self.families


def lines_of(registry: CollectorRegistry, family: str) -> list[str]:
    text = generate_latest(registry).decode()
    return [
        line
        for line in text.splitlines()
        if not line.startswith("#") and line.split("{")[0].rsplit("_", 1)[0] == family
    ]


# -- config info --------------------------------------------------------------------------------


def test_config_info_keeps_one_series(registry: CollectorRegistry) -> None:
    metrics = Metrics.for_registry(registry)
    metrics.config_info("v1")
    assert series(scrape(registry), "llm_config_info") == {frozenset({("version", "v1")}): 1.0}
    metrics.config_info("v2")
    metrics.config_info("v2")
    assert series(scrape(registry), "llm_config_info") == {frozenset({("version", "v2")}): 1.0}
    metrics.config_info("v1")
    assert series(scrape(registry), "llm_config_info") == {frozenset({("version", "v1")}): 1.0}


# -- provider health, computed at scrape --------------------------------------------------------------


def test_health_is_current_when_scraped(registry: CollectorRegistry, clock: FakeClock) -> None:
    metrics = Metrics.for_registry(registry)
    health = HealthTracker(HealthConfig(initial_backoff=30.0), clock=clock)
    router = TierRouter(
        config(
            simple=[model("openai", "gpt-4o-mini"), model("anthropic", "claude-haiku")],
            complex=[model("anthropic", "claude-sonnet")],
        ),
        health,
    )
    metrics.watch(router)
    assert series(scrape(registry), "llm_provider_health") == {
        frozenset({("provider", "openai"), ("model", "gpt-4o-mini")}): 1.0,
        frozenset({("provider", "anthropic"), ("model", "claude-haiku")}): 1.0,
        frozenset({("provider", "anthropic"), ("model", "claude-sonnet")}): 1.0,
    }
    health.record_failure("openai", "gpt-4o-mini")
    s = scrape(registry)
    assert value(s, "llm_provider_health", provider="openai", model="gpt-4o-mini") == 0.0
    assert value(s, "llm_provider_health", provider="anthropic", model="claude-haiku") == 1.0
    clock.advance(29.9)
    s = scrape(registry)
    assert value(s, "llm_provider_health", provider="openai", model="gpt-4o-mini") == 0.0
    clock.advance(0.2)  # the backoff has run out; nothing else happened
    s = scrape(registry)
    assert value(s, "llm_provider_health", provider="openai", model="gpt-4o-mini") == 1.0


def test_health_follows_a_config_swap(registry: CollectorRegistry) -> None:
    metrics = Metrics.for_registry(registry)
    router = TierRouter(config(simple=[model("openai", "a")]))
    metrics.watch(router)
    router.config = config(simple=[model("openai", "b")])
    assert series(scrape(registry), "llm_provider_health") == {
        frozenset({("provider", "openai"), ("model", "b")}): 1.0
    }


def test_a_model_in_two_tiers_is_one_series(registry: CollectorRegistry) -> None:
    metrics = Metrics.for_registry(registry)
    shared = model("openai", "gpt-4o")
    router = TierRouter(config(moderate=[shared], complex=[shared]))
    metrics.watch(router)
    assert series(scrape(registry), "llm_provider_health") == {
        frozenset({("provider", "openai"), ("model", "gpt-4o")}): 1.0
    }


def test_the_last_watched_router_wins(registry: CollectorRegistry, clock: FakeClock) -> None:
    metrics = Metrics.for_registry(registry)
    sick = HealthTracker(clock=clock)
    sick.record_failure("openai", "gpt-4o")
    first = TierRouter(config(simple=[model("openai", "gpt-4o"), model("x", "only-first")]), sick)
    second = TierRouter(config(simple=[model("openai", "gpt-4o")]), HealthTracker(clock=clock))
    metrics.watch(first)
    metrics.watch(second)
    s = scrape(registry)
    assert value(s, "llm_provider_health", provider="openai", model="gpt-4o") == 1.0
    assert value(s, "llm_provider_health", provider="x", model="only-first") == 1.0
    metrics.watch(first)  # watched again: now the latest
    metrics.watch(first)
    s = scrape(registry)
    assert value(s, "llm_provider_health", provider="openai", model="gpt-4o") == 0.0
    assert len(metrics.provider_health.routers()) == 2


def test_a_dead_router_disappears(registry: CollectorRegistry) -> None:
    metrics = Metrics.for_registry(registry)
    keep = TierRouter(config(simple=[model("openai", "kept")]))
    gone = TierRouter(config(simple=[model("openai", "gone")]))
    metrics.watch(keep)
    metrics.watch(gone)
    assert len(series(scrape(registry), "llm_provider_health")) == 2
    del gone
    gc.collect()
    assert series(scrape(registry), "llm_provider_health") == {
        frozenset({("provider", "openai"), ("model", "kept")}): 1.0
    }
    assert metrics.provider_health.routers() == [keep]


def test_health_without_routers_is_an_empty_family(registry: CollectorRegistry) -> None:
    Metrics.for_registry(registry)
    assert series(scrape(registry), "llm_provider_health") == {}


def test_a_broken_router_does_not_break_the_scrape(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(TierRouter):
        @property
        def config(self) -> TierConfig:
            raise RuntimeError("boom")

        @config.setter
        def config(self, value: TierConfig) -> None:
            pass

    metrics = Metrics.for_registry(registry)
    ok = TierRouter(config(simple=[model("openai", "ok")]))
    metrics.watch(ok)
    broken = Broken(config(simple=[model("openai", "x")]))
    metrics.watch(broken)
    assert series(scrape(registry), "llm_provider_health") == {
        frozenset({("provider", "openai"), ("model", "ok")}): 1.0
    }
    assert "cannot read the health" in caplog.text


# -- the /metrics app ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_metrics_app_serves_the_registry(registry: CollectorRegistry) -> None:
    metrics = Metrics.for_registry(registry, "sentinel")
    metrics.request("simple")
    app: Any = metrics_app(registry)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    sample = next(
        s for s in families["sentinel_tier_requests"].samples if s.name.endswith("_total")
    )
    assert sample.labels == {"tier": "simple"}
    assert sample.value == 1.0


# How each registration answers `/metrics` and `/metrics/` (None: the app itself answers, 200).
REGISTRATIONS: dict[str, tuple[int | None, int | None]] = {
    "add_route": (None, 307),  # the README's line; the slash form redirects to the route
    "add_route+mount": (None, None),  # both spellings answered
    "mount": (307, None),  # Starlette's Mount answers only below the path
}


@pytest.mark.anyio
@pytest.mark.parametrize("registration", REGISTRATIONS)
@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
@pytest.mark.parametrize("which", ["metrics", "status"])
async def test_the_small_apps_at_their_path_in_starlette_and_fastapi(
    registry: CollectorRegistry, framework: str, registration: str, which: str
) -> None:
    from fastapi import FastAPI
    from starlette.applications import Starlette

    app = FastAPI() if framework == "fastapi" else Starlette()
    path = f"/{which}"
    for how in registration.split("+"):
        # A new app each time, as a user's two lines would make.
        endpoint = metrics_app(registry) if which == "metrics" else status_app()
        if how == "mount":
            app.mount(path, endpoint)
        else:
            app.add_route(path, endpoint)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        for asked, expected in zip((path, f"{path}/"), REGISTRATIONS[registration], strict=True):
            response = await client.get(asked)
            if expected is None:
                assert response.status_code == 200, asked
                type_ = "text/plain" if which == "metrics" else "application/json"
                assert response.headers["content-type"].startswith(type_)
            else:
                assert response.status_code == expected, asked
                other = path if asked.endswith("/") else f"{path}/"
                assert response.headers["location"] == f"http://test{other}"


@pytest.mark.anyio
@pytest.mark.parametrize("which", ["metrics_app", "status_app"])
async def test_the_small_apps_acknowledge_lifespan(registry: CollectorRegistry, which: str) -> None:
    app = metrics_app(registry) if which == "metrics_app" else status_app()
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: Any) -> None:
        sent.append(dict(message))

    await app({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
