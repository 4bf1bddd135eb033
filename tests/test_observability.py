"""Observability end to end: scripted traffic through a real Starlette app, then `/metrics` scraped
over HTTP and parsed with prometheus_client's own parser, `/status` read as JSON, and the shipped
Grafana dashboard checked against what is actually exposed.

The app: TierRoutingMiddleware around a Starlette app with a fake LLM chat endpoint (a raw ASGI
app that answers per model with a scripted status, content type and body chunks), the metrics
app of the test's own CollectorRegistry mounted at /metrics and the status app of this very
middleware at /status. Time is a FakeClock: health never waits on the wall clock, and the one
test about durations drives the middleware's perf_counter by hand.
"""

from __future__ import annotations

import json
import random
import re
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from _clock import FakeClock
from asgi_harness import call, read_body
from samples import Samples, parse, series, total, value
from tier_middleware import (
    HealthConfig,
    HealthTracker,
    TierRoutingMiddleware,
    metrics_app,
    status_app,
)

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "examples" / "grafana" / "tier-routing.json"
CHAT = "/v1/chat/completions"

PRICES = {  # model -> (input, output) USD per million tokens
    "mini": (0.15, 0.6),
    "flash": (0.1, 0.4),
    "4o": (2.5, 10.0),
    "haiku": (0.8, 4.0),
    "opus": (15.0, 75.0),
}
PROVIDER = {
    "mini": "openai",
    "flash": "google",
    "4o": "openai",
    "haiku": "anthropic",
    "opus": "anthropic",
}
TIER_OF = {
    "mini": "simple",
    "flash": "simple",
    "4o": "moderate",
    "haiku": "moderate",
    "opus": "complex",
}
COSTS = {"mini": 1, "flash": 3, "4o": 5, "haiku": 5, "opus": 20}


def _model(name: str) -> dict[str, Any]:
    return {
        "provider": PROVIDER[name],
        "model": name,
        "relative_cost": COSTS[name],
        "input_price_per_million": PRICES[name][0],
        "output_price_per_million": PRICES[name][1],
    }


CONFIG: dict[str, Any] = {
    "version": "obs-1",
    "updated_at": "2025-01-02T03:04:05Z",
    "tier_order": ["simple", "moderate", "complex"],
    "tiers": {
        "simple": [_model("mini"), _model("flash")],
        "moderate": [_model("4o"), _model("haiku")],
        "complex": [_model("opus")],
    },
}
TIERS = ("simple", "moderate", "complex")
# Failing models stay in rotation: every request draws again, so failures and retries pile up.
NEVER_BACK_OFF = HealthConfig(failure_threshold=10**9, unconfirmed_threshold=1)
# These tests look at what counted failures show, so a failure no request got past counts at
# once here (the agreement of distinct requests is tested in test_attribution.py).
AT_ONCE = HealthConfig(unconfirmed_threshold=1)


# -- the fake LLM endpoint ------------------------------------------------------------------------


class FakeLLM:
    """A raw ASGI chat endpoint. Per model: the status to answer and the reply (content type and
    body chunks). Records the model of every call (the body's `model`, as the middleware rewrote
    it) and every body it sent. Optionally parks calls at a gate, and advances a clock before the
    response start (`think`) and after each body chunk (`gap`)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.status: dict[str, int] = {}
        self.replies: dict[str, tuple[bytes, list[bytes]]] = {}
        self.default: tuple[bytes, list[bytes]] = (b"application/json", [b'{"ok": true}'])
        self.sent: list[bytes] = []
        self.clock: FakeClock | None = None
        self.think: dict[str, float] = {}
        self.gap = 0.0
        self.gate: anyio.Event | None = None
        self.expect = 0
        self.parked = 0
        self.all_parked = anyio.Event()

    def reply(self, content_type: bytes, *chunks: bytes, model: str | None = None) -> None:
        if model is None:
            self.default = (content_type, list(chunks))
        else:
            self.replies[model] = (content_type, list(chunks))

    def hold(self, count: int) -> anyio.Event:
        """Park calls until the returned event is set; `all_parked` is set at the count-th."""
        self.gate = anyio.Event()
        self.expect = count
        return self.gate

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = await read_body(receive)
        model = json.loads(body)["model"]
        self.calls.append(model)
        if self.gate is not None and not self.gate.is_set():
            self.parked += 1
            if self.parked == self.expect:
                self.all_parked.set()
            await self.gate.wait()
        await anyio.lowlevel.checkpoint()
        if self.clock is not None:
            self.clock.advance(self.think.get(model, 0.0))
        content_type, chunks = self.replies.get(model, self.default)
        status = self.status.get(model, 200)
        headers = [(b"content-type", content_type)]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        for i, chunk in enumerate(chunks):
            await send(
                {"type": "http.response.body", "body": chunk, "more_body": i < len(chunks) - 1}
            )
            if self.clock is not None:
                self.clock.advance(self.gap)
        self.sent.append(b"".join(chunks))


# -- scraping -------------------------------------------------------------------------------------


def chat_body(tier: str | None = None, via: str = "body", **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], **fields}
    if tier is not None and via == "body":
        body["tier"] = tier
    elif tier is not None and via == "model":
        body["model"] = f"tier:{tier}"
    return body


class Stack:
    def __init__(
        self,
        mw: TierRoutingMiddleware,
        llm: FakeLLM,
        registry: CollectorRegistry,
        client: httpx.AsyncClient,
        clock: FakeClock,
    ) -> None:
        self.mw = mw
        self.llm = llm
        self.registry = registry
        self.client = client
        self.clock = clock
        self.sent = 0

    async def chat(
        self, tier: str, *, via: str = "body", headers: dict[str, str] | None = None
    ) -> httpx.Response:
        """A chat request; each from another user (distinct bodies, as real traffic has)."""
        headers = dict(headers or {})
        if via == "header":
            headers["x-tier"] = tier
        self.sent += 1
        body = chat_body(tier, via, user=f"user-{self.sent}")
        return await self.client.post(CHAT, json=body, headers=headers)

    async def scrape(self) -> Samples:
        response = await self.client.get("/metrics/")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        return parse(response.text)

    async def status(self) -> dict[str, Any]:
        response = await self.client.get("/status/")
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        document: dict[str, Any] = response.json()
        return document


@asynccontextmanager
async def running(
    llm: FakeLLM | None = None,
    *,
    registry: CollectorRegistry | None = None,
    health: HealthConfig | None = None,
    clock: FakeClock | None = None,
    seed: int = 7,
    **options: Any,
) -> AsyncIterator[Stack]:
    llm = llm or FakeLLM()
    registry = registry if registry is not None else CollectorRegistry()
    clock = clock or FakeClock()
    tracker = HealthTracker(health or AT_ONCE, clock=clock, rng=random.Random(seed))
    app = Starlette(
        routes=[Route(CHAT, llm, methods=["POST"]), Mount("/metrics", metrics_app(registry))]
    )
    options.setdefault("config", CONFIG)
    mw = TierRoutingMiddleware(
        app,
        routes=[CHAT],
        registry=registry,
        health=tracker,
        rng=random.Random(seed),
        **options,
    )
    app.router.routes.append(Mount("/status", status_app(mw)))
    transport = httpx.ASGITransport(app=mw)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        try:
            yield Stack(mw, llm, registry, client, clock)
        finally:
            await mw.aclose()


def usage_json(prompt: int, completion: int) -> bytes:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    body = {"id": "c1", "object": "chat.completion", "choices": [], "usage": usage}
    return json.dumps(body).encode()


def cost(model: str, prompt: int, completion: int) -> float:
    return (prompt * PRICES[model][0] + completion * PRICES[model][1]) / 1e6


# -- counting requests, selections, failures, retries -------------------------------------------


@pytest.mark.anyio
async def test_requests_per_tier_and_selections_per_model_add_up_to_app_calls() -> None:
    async with running() as s:
        plan = [("simple", "body")] * 4 + [("simple", "header"), ("simple", "model")] * 2
        plan += [("moderate", "body"), ("moderate", "header")] * 2 + [("complex", "model")] * 3
        plan *= 3
        for tier, via in plan:
            response = await s.chat(tier, via=via)
            assert response.status_code == 200
            assert response.headers["x-tier"] == tier
            assert response.headers["x-tier-attempts"] == "1"
        samples = await s.scrape()

    requests = series(samples, "llm_tier_requests_total")
    assert requests == {
        frozenset({("tier", "simple")}): 24.0,
        frozenset({("tier", "moderate")}): 12.0,
        frozenset({("tier", "complex")}): 9.0,
    }
    calls = Counter(s.llm.calls)
    assert sum(calls.values()) == len(plan) == 45
    assert set(calls) >= {"mini", "flash", "4o", "haiku", "opus"}  # the draw reached every model
    selections = series(samples, "llm_model_selections_total")
    assert selections == {
        frozenset({("tier", TIER_OF[m]), ("provider", PROVIDER[m]), ("model", m)}): float(n)
        for m, n in calls.items()
    }
    for tier in TIERS:
        assert (
            total(samples, "llm_model_selections_total", tier=tier)
            == requests[frozenset({("tier", tier)})]
        )
    # One duration observation per attempt, under the same labels.
    for m, n in calls.items():
        labels = {"tier": TIER_OF[m], "provider": PROVIDER[m], "model": m}
        assert value(samples, "llm_request_duration_seconds_count", **labels) == n
        assert value(samples, "llm_request_duration_seconds_bucket", le="+Inf", **labels) == n
    # Nothing failed, nothing was retried, no usage was reported.
    for name in (
        "llm_provider_failures_total",
        "llm_model_retries_total",
        "llm_tier_unavailable_total",
        "llm_tokens_total",
        "llm_cost_usd_total",
    ):
        assert series(samples, name) == {}, name
    assert value(samples, "llm_config_info", version="obs-1") == 1.0


@pytest.mark.anyio
async def test_failures_and_retries_reconcile_exactly_with_app_calls() -> None:
    llm = FakeLLM()
    llm.status.update({"mini": 503, "4o": 500, "haiku": 502, "opus": 429})
    async with running(llm, health=NEVER_BACK_OFF) as s:
        attempts_seen = 0
        statuses: dict[str, Counter[int]] = {t: Counter() for t in TIERS}
        plan = ["simple"] * 40 + ["moderate"] * 6 + ["complex"] * 3
        for tier in plan:
            response = await s.chat(tier)
            statuses[tier][response.status_code] += 1
            attempts_seen += int(response.headers["x-tier-attempts"])
        samples = await s.scrape()

    calls = Counter(llm.calls)
    app_calls = len(llm.calls)
    # simple: a failed mini is retried on flash, which answers; moderate: both models fail, one
    # retry each; complex: a single model, nothing to retry on.
    # The client sees the last attempt's answer: haiku's 502 when 4o went first, 4o's 500 else.
    assert statuses["simple"] == Counter({200: 40})
    assert statuses["complex"] == Counter({429: 3})
    assert set(statuses["moderate"]) <= {500, 502}
    assert statuses["moderate"].total() == 6
    assert calls["mini"] >= 5  # the scenario did exercise the retry (seeded draw)
    assert calls["4o"] == calls["haiku"] == 6  # each moderate request tried both
    assert calls["opus"] == 3
    assert attempts_seen == app_calls

    first_attempts = total(samples, "llm_tier_requests_total")
    retries = total(samples, "llm_model_retries_total")
    selections = total(samples, "llm_model_selections_total")
    assert first_attempts == len(plan) == 49
    assert selections == app_calls == first_attempts + retries
    assert total(samples, "llm_request_duration_seconds_count") == app_calls

    failures = series(samples, "llm_provider_failures_total")
    assert failures == {
        frozenset({("provider", PROVIDER[m]), ("model", m)}): float(calls[m])
        for m in ("mini", "4o", "haiku", "opus")
    }
    assert series(samples, "llm_model_retries_total") == {
        frozenset({("tier", "simple"), ("failed_model", "mini"), ("retry_model", "flash")}): float(
            calls["mini"]
        ),
        frozenset({("tier", "moderate"), ("failed_model", "4o"), ("retry_model", "haiku")}): float(
            statuses["moderate"][502]
        ),
        frozenset({("tier", "moderate"), ("failed_model", "haiku"), ("retry_model", "4o")}): float(
            statuses["moderate"][500]
        ),
    }
    # Every simple request reached flash exactly once; a model's selections are its app calls.
    assert calls["flash"] == 40
    for m in calls:
        labels = {"tier": TIER_OF[m], "provider": PROVIDER[m], "model": m}
        assert value(samples, "llm_model_selections_total", **labels) == calls[m]
        assert value(samples, "llm_request_duration_seconds_count", **labels) == calls[m]
    assert series(samples, "llm_tier_unavailable_total") == {}  # never backed off: no 503s


@pytest.mark.anyio
async def test_duration_is_one_observation_per_attempt_up_to_the_response_start() -> None:
    clock = FakeClock(500.0)  # the health clock: durations are measured on it
    llm = FakeLLM()
    llm.clock = clock
    llm.status["mini"] = 503
    llm.think.update({"mini": 2.5, "flash": 0.07})
    llm.gap = 10.0  # streaming the body afterwards takes long: not part of the duration
    llm.reply(b"application/json", b'{"a": ', b"1, ", b'"b": 2}')
    async with running(llm, health=NEVER_BACK_OFF, clock=clock) as s:
        for _ in range(10):
            assert (await s.chat("simple")).status_code == 200
        samples = await s.scrape()

    calls = Counter(llm.calls)
    assert calls["flash"] == 10
    assert calls["mini"] >= 3
    mini = {"tier": "simple", "provider": "openai", "model": "mini"}
    flash = {"tier": "simple", "provider": "google", "model": "flash"}
    bucket = "llm_request_duration_seconds_bucket"
    assert value(samples, "llm_request_duration_seconds_count", **mini) == calls["mini"]
    assert value(samples, "llm_request_duration_seconds_sum", **mini) == pytest.approx(
        2.5 * calls["mini"]
    )
    assert value(samples, bucket, le="2.0", **mini) == 0
    assert value(samples, bucket, le="3.0", **mini) == calls["mini"]
    assert value(samples, "llm_request_duration_seconds_count", **flash) == 10
    assert value(samples, "llm_request_duration_seconds_sum", **flash) == pytest.approx(0.7)
    assert value(samples, bucket, le="0.05", **flash) == 0
    assert value(samples, bucket, le="0.1", **flash) == 10


# -- health, backoff and 503s ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_provider_health_gauge_follows_the_backoff_on_the_injected_clock() -> None:
    llm = FakeLLM()
    llm.status["opus"] = 503
    config = HealthConfig(initial_backoff=30.0, max_backoff=300.0, unconfirmed_threshold=1)
    async with running(llm, health=config) as s:
        before = await s.scrape()
        health = series(before, "llm_provider_health")
        assert health == {
            frozenset({("provider", PROVIDER[m]), ("model", m)}): 1.0 for m in PROVIDER
        }

        response = await s.chat("complex")
        assert response.status_code == 503  # the provider's own answer, passed through
        assert response.headers["x-tier-attempts"] == "1"
        opus = {"provider": "anthropic", "model": "opus"}
        assert value(await s.scrape(), "llm_provider_health", **opus) == 0.0

        s.clock.advance(29.999)
        samples = await s.scrape()
        assert value(samples, "llm_provider_health", **opus) == 0.0
        assert total(samples, "llm_provider_health") == len(PROVIDER) - 1

        s.clock.advance(0.002)  # the backoff ran out; no request, no other event
        assert value(await s.scrape(), "llm_provider_health", **opus) == 1.0

        # The half-open probe fails: a second, doubled backoff.
        assert (await s.chat("complex")).status_code == 503
        assert value(await s.scrape(), "llm_provider_health", **opus) == 0.0
        s.clock.advance(59.99)
        assert value(await s.scrape(), "llm_provider_health", **opus) == 0.0
        s.clock.advance(0.02)
        assert value(await s.scrape(), "llm_provider_health", **opus) == 1.0

        # The next probe succeeds: healthy for good, whatever the clock does.
        llm.status.clear()
        assert (await s.chat("complex")).status_code == 200
        s.clock.advance(10_000)
        samples = await s.scrape()
        assert total(samples, "llm_provider_health") == len(PROVIDER)
        assert value(samples, "llm_provider_failures_total", **opus) == 2


@pytest.mark.anyio
async def test_tier_unavailable_counts_the_middlewares_own_503s_only() -> None:
    llm = FakeLLM()
    llm.status.update({"opus": 503, "4o": 500, "haiku": 500})
    async with running(
        llm, health=HealthConfig(initial_backoff=30.0, unconfirmed_threshold=1)
    ) as s:
        first = await s.chat("complex")
        assert first.status_code == 503
        assert first.headers["x-tier-attempts"] == "1"  # the provider's 503: not "unavailable"
        samples = await s.scrape()
        assert series(samples, "llm_tier_unavailable_total") == {}

        for _ in range(4):
            response = await s.chat("complex")
            assert response.status_code == 503
            assert response.headers["x-tier-attempts"] == "0"
            assert response.json()["error"]["code"] == "service_unavailable"
        # Both moderate models fail on the first request, so the second finds none.
        assert (await s.chat("moderate")).status_code == 500
        assert (await s.chat("moderate")).status_code == 503
        assert (await s.chat("simple")).status_code == 200

        s.clock.advance(30.0)
        llm.status.clear()
        assert (await s.chat("complex")).status_code == 200
        samples = await s.scrape()

    assert series(samples, "llm_tier_unavailable_total") == {
        frozenset({("tier", "complex")}): 4.0,
        frozenset({("tier", "moderate")}): 1.0,
    }
    assert value(samples, "llm_tier_requests_total", tier="complex") == 6
    assert value(samples, "llm_tier_requests_total", tier="moderate") == 2
    assert value(samples, "llm_tier_requests_total", tier="simple") == 1
    # A 503 short-circuit calls no model: selections are the calls the app saw.
    assert total(samples, "llm_model_selections_total") == len(llm.calls) == 5
    assert total(samples, "llm_model_selections_total", tier="complex") == 2


# -- tokens and cost ------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500},
        {"input_tokens": 1000, "output_tokens": 500},
    ],
    ids=["openai", "anthropic"],
)
async def test_tokens_and_cost_from_a_json_usage_block(usage: dict[str, int]) -> None:
    llm = FakeLLM()
    body = json.dumps({"id": "x", "choices": [{"index": 0}], "usage": usage}).encode()
    llm.reply(b"application/json; charset=utf-8", body[:10], body[10:])
    async with running(llm) as s:
        for tier in ["simple"] * 16 + ["complex"] * 2:
            response = await s.chat(tier)
            assert response.status_code == 200
            assert response.content == body
        samples = await s.scrape()

    calls = Counter(llm.calls)
    assert set(calls) == {"mini", "flash", "opus"}
    tokens = series(samples, "llm_tokens_total")
    expected_tokens = {}
    expected_cost = {}
    for m, n in calls.items():
        labels = {("tier", TIER_OF[m]), ("provider", PROVIDER[m]), ("model", m)}
        expected_tokens[frozenset(labels | {("kind", "input")})] = 1000.0 * n
        expected_tokens[frozenset(labels | {("kind", "output")})] = 500.0 * n
        expected_cost[frozenset(labels)] = pytest.approx(cost(m, 1000, 500) * n)
    assert tokens == expected_tokens
    assert series(samples, "llm_cost_usd_total") == expected_cost
    assert total(samples, "llm_cost_usd_total") == pytest.approx(
        sum(cost(m, 1000, 500) * n for m, n in calls.items())
    )


SSE_EVENTS = [
    b'data: {"id":"c1","choices":[{"delta":{"role":"assistant"}}],"usage":null}\n\n',
    b'data: {"id":"c1","choices":[{"delta":{"content":"Hel"}}],"usage":null}\r\n\r\n',
    b": keep-alive comment\n\n",
    b'data: {"id":"c1","choices":[{"delta":{"content":"lo \\u00e9\xe2\x9c\x93"}}]}\n\n',
    b'data: {"id":"c1","choices":[],\ndata: "usage":{"prompt_tokens":12,"completion_tokens":34,'
    b'"total_tokens":46}}\n\n',
    b"data: [DONE]\n\n",
]
SSE_STREAM = b"".join(SSE_EVENTS)


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.anyio
@pytest.mark.parametrize("size", [1, 7, 64, len(SSE_STREAM)])
async def test_sse_usage_in_the_final_chunk_is_counted_and_the_stream_arrives_unchanged(
    size: int,
) -> None:
    llm = FakeLLM()
    llm.reply(b"text/event-stream; charset=utf-8", *split(SSE_STREAM, size))
    async with running(llm) as s:
        for _ in range(3):
            response = await s.chat("complex")
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert response.content == SSE_STREAM
        samples = await s.scrape()

    labels = {"tier": "complex", "provider": "anthropic", "model": "opus"}
    assert value(samples, "llm_tokens_total", kind="input", **labels) == 36
    assert value(samples, "llm_tokens_total", kind="output", **labels) == 102
    assert value(samples, "llm_cost_usd_total", **labels) == pytest.approx(3 * cost("opus", 12, 34))
    assert llm.sent == [SSE_STREAM] * 3


MALFORMED: dict[str, tuple[bytes, list[bytes], int]] = {
    "string counts": (
        b"application/json",
        [b'{"usage": {"prompt_tokens": "1000", "completion_tokens": "500"}}'],
        200,
    ),
    "negative count": (
        b"application/json",
        [b'{"usage": {"prompt_tokens": -1000, "completion_tokens": 500}}'],
        200,
    ),
    "fractional count": (
        b"application/json",
        [b'{"usage": {"prompt_tokens": 10.5, "completion_tokens": 500}}'],
        200,
    ),
    "boolean count": (
        b"application/json",
        [b'{"usage": {"prompt_tokens": true, "completion_tokens": 500}}'],
        200,
    ),
    "absurd count": (
        b"application/json",
        [b'{"usage": {"prompt_tokens": 1152921504606846976, "completion_tokens": 5}}'],
        200,
    ),
    "usage is a list": (b"application/json", [b'{"usage": [1000, 500]}'], 200),
    "usage is null": (b"application/json", [b'{"usage": null}'], 200),
    "json cut short": (
        b"application/json",
        [b'{"usage": {"prompt_tokens": 1000, ', b'"completion_tokens": 500}'],
        200,
    ),
    "not json": (
        b"application/json",
        [b'not json {"usage": {"prompt_tokens": 1000, "completion_tokens": 500}}'],
        200,
    ),
    "json array": (
        b"application/json",
        [b'[{"usage": {"prompt_tokens": 1000, "completion_tokens": 500}}]'],
        200,
    ),
    "invalid utf-8": (
        b"application/json",
        [b'{"usage": {"prompt_tokens": 1000, "completion_tokens": 500}, "x": "\xff\xfe"}'],
        200,
    ),
    "a 4xx answer": (
        b"application/json",
        [b'{"usage": {"prompt_tokens": 1000, "completion_tokens": 500}}'],
        400,
    ),
    "not json media type": (
        b"text/plain",
        [b'{"usage": {"prompt_tokens": 1000, "completion_tokens": 500}}'],
        200,
    ),
    "sse cut inside the usage event": (
        b"text/event-stream",
        [b'data: {"choices":[]}\n\n', b'data: {"usage": {"prompt_tokens": 1000, "compl'],
        200,
    ),
    "sse usage event never terminated": (
        b"text/event-stream",
        [
            b'data: {"choices":[]}\n\ndata: {"usage": {"prompt_tokens": 1000, "completion_tokens": 5}}'
        ],
        200,
    ),
    "sse string counts": (
        b"text/event-stream",
        [b'data: {"usage": {"prompt_tokens": "1000", "completion_tokens": "5"}}\n\n'],
        200,
    ),
    "sse usage not json": (
        b"text/event-stream",
        [b'data: {"usage": {"prompt_tokens": 1000, oops}}\n\ndata: [DONE]\n\n'],
        200,
    ),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_usage_changes_no_counter_and_reaches_the_client_as_sent(
    case: str,
) -> None:
    content_type, chunks, status = MALFORMED[case]
    llm = FakeLLM()
    llm.reply(b"application/json", usage_json(100, 10))
    labels = {"tier": "complex", "provider": "anthropic", "model": "opus"}
    async with running(llm) as s:
        assert (await s.chat("complex")).status_code == 200  # a valid baseline
        baseline = await s.scrape()
        assert value(baseline, "llm_tokens_total", kind="input", **labels) == 100
        assert value(baseline, "llm_tokens_total", kind="output", **labels) == 10
        assert value(baseline, "llm_cost_usd_total", **labels) == pytest.approx(
            cost("opus", 100, 10)
        )

        llm.reply(content_type, *chunks)
        llm.status["opus"] = status
        for _ in range(2):
            response = await s.chat("complex")
            assert response.status_code == status
            assert response.content == b"".join(chunks)
        after = await s.scrape()

    for name in ("llm_tokens_total", "llm_cost_usd_total"):
        assert series(after, name) == series(baseline, name), name
    assert value(after, "llm_model_selections_total", **labels) == 3


@pytest.mark.anyio
async def test_a_stream_the_app_breaks_off_with_an_exception_counts_no_usage() -> None:
    """The app sends a complete usage event, then raises: the attempt failed (it is counted as a
    provider failure) and the middleware lets the exception reach the server."""

    class Breaking(FakeLLM):
        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            await receive()
            self.calls.append("opus")
            start = {"type": "http.response.start", "status": 200}
            await send({**start, "headers": [(b"content-type", b"text/event-stream")]})
            usage = b'data: {"usage": {"prompt_tokens": 7, "completion_tokens": 3}}\n\n'
            await send({"type": "http.response.body", "body": usage, "more_body": True})
            raise RuntimeError("upstream connection reset")

    registry = CollectorRegistry()
    async with running(Breaking(), registry=registry) as s:
        body = json.dumps(chat_body("complex")).encode()
        with pytest.raises(RuntimeError, match="upstream connection reset"):
            await call(s.mw, body, path=CHAT)
        samples = parse(generate_latest(registry).decode())
    opus = {"provider": "anthropic", "model": "opus"}
    assert value(samples, "llm_provider_failures_total", **opus) == 1
    assert series(samples, "llm_tokens_total") == {}
    assert series(samples, "llm_cost_usd_total") == {}


# -- naming and registration ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_metrics_namespace_prefixes_every_series() -> None:
    llm = FakeLLM()
    llm.status["opus"] = 503
    llm.reply(b"application/json", usage_json(3, 4))
    async with running(llm, metrics_namespace="sentinel", health=NEVER_BACK_OFF) as s:
        for tier in ("simple", "complex", "moderate", "complex"):
            await s.chat(tier)
        samples = await s.scrape()

    names = {name for name, _ in samples}
    for name in (
        "sentinel_tier_requests_total",
        "sentinel_model_selections_total",
        "sentinel_provider_failures_total",
        "sentinel_provider_health",
        "sentinel_request_duration_seconds_bucket",
        "sentinel_tokens_total",
        "sentinel_cost_usd_total",
        "sentinel_config_info",
    ):
        assert name in names, name
    assert not any(name.startswith("llm_") for name in names)
    assert value(samples, "sentinel_tier_requests_total", tier="complex") == 2
    opus = {"provider": "anthropic", "model": "opus"}
    assert value(samples, "sentinel_provider_failures_total", **opus) == 2

    # A retry, to see the retries counter under the namespace too.
    llm2 = FakeLLM()
    llm2.status["mini"] = 503
    async with running(llm2, metrics_namespace="sentinel", health=NEVER_BACK_OFF) as s:
        for _ in range(10):
            await s.chat("simple")
        samples = await s.scrape()
    retries = series(samples, "sentinel_model_retries_total")
    assert retries == {
        frozenset({("tier", "simple"), ("failed_model", "mini"), ("retry_model", "flash")}): float(
            Counter(llm2.calls)["mini"]
        )
    }
    assert retries  # the seeded draw did pick mini first at least once


@pytest.mark.anyio
async def test_building_the_middleware_twice_on_one_registry_shares_the_series() -> None:
    registry = CollectorRegistry()
    llm = FakeLLM()
    first = TierRoutingMiddleware(llm, config=CONFIG, routes=[CHAT], registry=registry)
    second = TierRoutingMiddleware(llm, config=CONFIG, routes=[CHAT], registry=registry)
    other = TierRoutingMiddleware(
        llm, config=CONFIG, routes=[CHAT], registry=registry, metrics_namespace="other"
    )
    body = json.dumps(chat_body("simple")).encode()
    for mw in (first, second, second, other):
        assert (await call(mw, body, path=CHAT)).status == 200
    samples = parse(generate_latest(registry).decode())
    assert value(samples, "llm_tier_requests_total", tier="simple") == 3
    assert value(samples, "other_tier_requests_total", tier="simple") == 1
    assert total(samples, "llm_model_selections_total") == 3
    for mw in (first, second, other):
        await mw.aclose()


@pytest.mark.anyio
async def test_starlette_add_middleware_and_a_stack_built_twice_count_requests_once() -> None:
    registry = CollectorRegistry()
    llm = FakeLLM()
    app = Starlette(
        routes=[Route(CHAT, llm, methods=["POST"]), Mount("/metrics", metrics_app(registry))]
    )
    app.add_middleware(TierRoutingMiddleware, config=CONFIG, routes=[CHAT], registry=registry)
    stacks = [app.build_middleware_stack(), app.build_middleware_stack()]
    assert stacks[0] is not stacks[1]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        for _ in range(5):
            response = await client.post(CHAT, json=chat_body("moderate"))
            assert response.status_code == 200
            assert response.headers["x-tier"] == "moderate"
        scraped = await client.get("/metrics/")
    samples = parse(scraped.text)
    assert value(samples, "llm_tier_requests_total", tier="moderate") == 5
    assert total(samples, "llm_model_selections_total") == 5 == len(llm.calls)
    # Every live router reports the same models: one series per model, no duplicates.
    assert len(series(samples, "llm_provider_health")) == len(PROVIDER)


# -- cardinality ----------------------------------------------------------------------------------


def garbage_tiers(rng: random.Random, count: int) -> Iterable[tuple[str, Any]]:
    """(where, value) pairs naming no configured tier: ascii, unicode, long, non-strings."""
    valid = set(TIERS)
    unicode_pool = "ÄßçØ漢字かなКириллицаعربيעברית🙂🚀\u200b\u0301\u00a0\ufeff\u2028"
    printable = [chr(c) for c in range(32, 127)]
    non_strings: list[Any] = [None, 0, 1, -1, 3.5, True, False, [], ["simple"], {"tier": "x"}]
    for i in range(count):
        kind = i % 7
        value: Any
        if kind == 0:
            value = "".join(rng.choices(printable, k=rng.randint(1, 40)))
        elif kind == 1:
            value = "".join(rng.choices(unicode_pool, k=rng.randint(1, 30)))
        elif kind == 2:
            value = "".join(rng.choices(printable + list(unicode_pool), k=rng.randint(65, 3000)))
        elif kind == 3:
            value = "".join(rng.choices(printable, k=rng.randint(1, 80)))
        elif kind == 4:
            value = "".join(chr(rng.randint(128, 255)) for _ in range(rng.randint(1, 20)))
        elif kind == 5:
            value = "".join(rng.choices(printable + list(unicode_pool), k=rng.randint(0, 70)))
        else:
            value = non_strings[i // 7 % len(non_strings)]
        if isinstance(value, str) and value.strip().lower() in valid:
            continue
        where = {0: "body", 1: "body", 2: "body", 3: "header", 4: "header", 5: "model"}
        yield where.get(kind, "body"), value


@pytest.mark.anyio
async def test_ten_thousand_garbage_tiers_create_no_series() -> None:
    async with running(health=NEVER_BACK_OFF) as s:
        for tier in TIERS:  # the legitimate series exist before the garbage arrives
            assert (await s.chat(tier)).status_code == 200
        before = parse(generate_latest(s.registry).decode())

        sent = Counter[str]()
        codes = Counter[str]()
        for where, tier in garbage_tiers(random.Random(2024), 10_000):
            headers = [("content-type", "application/json")]
            if where == "header":
                headers.append(("x-tier", tier))
                body = chat_body()
            elif where == "model":
                body = chat_body(model=f"tier:{tier}")
            else:
                body = {**chat_body(), "tier": tier}  # also null, numbers, lists, objects
            result = await call(s.mw, json.dumps(body).encode(), path=CHAT, headers=headers)
            assert result.status == 400, (where, tier, result.body[:200])
            codes[result.json()["error"]["code"]] += 1
            sent[where] += 1
        after = parse(generate_latest(s.registry).decode())

    assert sum(sent.values()) >= 9_990
    assert min(sent.values()) >= 1_000
    assert codes == Counter({"invalid_tier": sum(sent.values())})
    assert len(s.llm.calls) == 3  # the garbage reached no model
    assert len(after) == len(before)
    assert after == before  # not one new series, not one counter moved


# -- scraping under load --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_scrapes_during_500_concurrent_requests_parse_and_end_consistent() -> None:
    llm = FakeLLM()
    llm.status["mini"] = 503
    llm.reply(b"application/json", usage_json(10, 2))
    gate = llm.hold(500)
    stop = threading.Event()
    thread_scrapes: list[int] = []
    thread_errors: list[BaseException] = []

    async with running(llm, health=NEVER_BACK_OFF) as s:

        def scrape_in_a_thread() -> None:  # like prometheus_client's own HTTP server thread
            try:
                while True:
                    samples = parse(generate_latest(s.registry).decode())
                    thread_scrapes.append(int(total(samples, "llm_tier_requests_total")))
                    if stop.is_set():
                        return
            except BaseException as exc:
                thread_errors.append(exc)

        thread = threading.Thread(target=scrape_in_a_thread, daemon=True)
        thread.start()
        done = 0
        statuses = Counter[tuple[int, str]]()
        loop_scrapes: list[tuple[float, float, float]] = []

        async def one(i: int) -> None:
            nonlocal done
            try:
                response = await s.chat(TIERS[i % 3], headers={"x-session-id": f"s{i}"})
                statuses[response.status_code, response.headers["x-tier-model"]] += 1
            finally:
                done += 1

        async def scraper() -> None:
            await llm.all_parked.wait()
            # All 500 requests are in the app: routed and counted, none answered yet.
            samples = await s.scrape()
            assert total(samples, "llm_tier_requests_total") == 500
            assert total(samples, "llm_model_selections_total") == 500
            assert total(samples, "llm_request_duration_seconds_count") == 0
            status = await s.status()
            assert status["routers"][0]["config"]["version"] == "obs-1"
            gate.set()
            while done < 500:
                await anyio.lowlevel.checkpoint()  # a scrape alone may never yield to the loop
                samples = await s.scrape()
                loop_scrapes.append(
                    (
                        total(samples, "llm_model_selections_total"),
                        total(samples, "llm_request_duration_seconds_count"),
                        total(samples, "llm_tokens_total", kind="input"),
                    )
                )

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(scraper)
                for i in range(500):
                    tg.start_soon(one, i)
        finally:
            stop.set()
            thread.join(timeout=30)
        assert not thread.is_alive()
        final = await s.scrape()
        sessions = (await s.status())["routers"][0]["sessions"]

    assert thread_errors == []
    assert thread_scrapes
    assert all(0 <= n <= 500 for n in thread_scrapes)
    assert thread_scrapes == sorted(thread_scrapes)  # counters never go backwards
    assert loop_scrapes
    for column in zip(*loop_scrapes, strict=True):  # each counter on its own never goes back
        assert list(column) == sorted(column)
    calls = Counter(llm.calls)
    app_calls = len(llm.calls)
    assert calls["mini"] > 0
    assert total(final, "llm_tier_requests_total") == 500
    for tier in TIERS:
        expected = len(range(TIERS.index(tier), 500, 3))
        assert value(final, "llm_tier_requests_total", tier=tier) == expected
    assert total(final, "llm_model_selections_total") == app_calls
    # A failed mini is retried on flash unless the retry budget (20% of the requests in flight)
    # is spent: then the client gets mini's 503 and the skipped retry is counted.
    retries = total(final, "llm_model_retries_total")
    over_budget = total(final, "llm_retries_over_budget_total")
    assert retries > 0
    assert over_budget > 0
    assert retries == app_calls - 500
    assert total(final, "llm_provider_failures_total") == calls["mini"] == retries + over_budget
    assert statuses[503, "mini"] == over_budget
    assert sessions == 500 - over_budget  # a request that ended in a failure keeps no session
    assert set(statuses) <= {
        (503, "mini"),
        (200, "flash"),
        (200, "4o"),
        (200, "haiku"),
        (200, "opus"),
    }
    assert total(final, "llm_request_duration_seconds_count") == app_calls
    answered = 500 - over_budget  # a 503 carries no usage
    assert total(final, "llm_tokens_total", kind="input") == answered * 10
    assert total(final, "llm_tokens_total", kind="output") == answered * 2


# -- the status page ------------------------------------------------------------------------------


def _row(model: str, probability: float, **health: Any) -> dict[str, Any]:
    row = {
        "provider": PROVIDER[model],
        "model": model,
        "relative_cost": COSTS[model],
        "probability": probability,
        "health": "available",
        "consecutive_failures": 0,
        "backoff_remaining": None,
        "unconfirmed_failures": 0,
    }
    row.update(health)
    return row


@pytest.mark.anyio
async def test_status_json_through_the_app(tmp_path: Path) -> None:
    path = tmp_path / "tiers.json"
    path.write_text(json.dumps(CONFIG))
    llm = FakeLLM()
    llm.status["opus"] = 503
    async with running(llm, config=path, name="obs-status") as s:
        document = await s.status()
        [router] = document["routers"]
        assert router["name"] == "obs-status"
        assert router["config"] == {
            "version": "obs-1",
            "updated_at": "2025-01-02T03:04:05Z",
            "source": str(path),
        }
        assert router["sessions"] == 0
        assert router["tiers"] == {
            "simple": [_row("mini", 0.75), _row("flash", 0.25)],
            "moderate": [_row("4o", 0.5), _row("haiku", 0.5)],
            "complex": [_row("opus", 1.0)],
        }

        # Sessions: two ids for one caller, the same id for another caller, repeats do not count.
        owner_a = {"authorization": "Bearer a"}
        owner_b = {"authorization": "Bearer b"}
        for sid, owner in [("s-1", owner_a), ("s-2", owner_a), ("s-1", owner_a), ("s-1", owner_b)]:
            response = await s.chat("simple", headers={**owner, "x-session-id": sid})
            assert response.status_code == 200
        assert (await s.chat("moderate")).status_code == 200  # no session id: no session
        assert (await s.status())["routers"][0]["sessions"] == 3

        assert (await s.chat("complex")).status_code == 503
        s.clock.advance(12.5)
        complex_rows = (await s.status())["routers"][0]["tiers"]["complex"]
        assert complex_rows == [
            _row(
                "opus",
                0.0,
                health="backoff",
                consecutive_failures=1,
                backoff_remaining=17.5,
            )
        ]
        s.clock.advance(17.5)
        complex_rows = (await s.status())["routers"][0]["tiers"]["complex"]
        assert complex_rows == [
            _row("opus", 1.0, health="probing", consecutive_failures=1, backoff_remaining=0.0)
        ]
        llm.status.clear()
        assert (await s.chat("complex")).status_code == 200
        document = await s.status()
        assert document["routers"][0]["tiers"]["complex"] == [_row("opus", 1.0)]
        assert document["routers"][0]["tiers"]["simple"] == [
            _row("mini", 0.75),
            _row("flash", 0.25),
        ]

        refused = await s.client.post("/status/", json={})
        assert refused.status_code == 405
        assert refused.headers["allow"] == "GET, HEAD"


# -- the Grafana dashboard ------------------------------------------------------------------------

PROMQL_WORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "Inf",
    "NaN",
}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (function and aggregation names, keywords, label
    names and Grafana variables left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # $__rate_interval, ${tier}
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if match.group() not in PROMQL_WORDS:
            names.add(match.group())
    return names


def test_promql_metric_names_reads_expressions_the_way_the_dashboard_writes_them() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, tier) (rate(llm_request_duration_seconds_bucket{tier=~"$tier"}'
        "[$__rate_interval]))) / on (tier) group_left sum without (model) (llm_x_total offset 5m) "
        "> bool 0 and max(llm_provider_health)"
    )
    assert promql_metric_names(expr) == {
        "llm_request_duration_seconds_bucket",
        "llm_x_total",
        "llm_provider_health",
    }


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # panels inside a collapsed row
    return panels


def exposed_names(text: str) -> set[str]:
    """Every sample name the exposition can hold, from the families (also those without samples
    yet: a labelled counter nobody incremented is still announced with HELP and TYPE)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gauge": ("",),
        "summary": ("", "_count", "_sum", "_created"),
    }
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def test_grafana_dashboard_has_the_panels_and_queries_only_exposed_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(dashboard["schemaVersion"], int)
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["title"]
    assert dashboard["uid"]
    assert dashboard.get("id") is None
    inputs = {i["name"]: i for i in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"

    panels = dashboard_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    expressions: dict[str, list[str]] = {}
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs
        assert len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        expressions[panel["title"]] = [t["expr"] for t in panel["targets"]]
    required = {r["id"] for r in dashboard["__requires"] if r["type"] == "panel"}
    assert {p["type"] for p in panels if p["type"] != "row"} <= required
    referenced = set()
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\(([A-Za-z_:][\w:]*)(\{[^}]*\})?, *\w+\)", query)
            assert match, query
            referenced.add(match.group(1))

    # The panels the dashboard promises, found by what they query.
    def panel_using(metric: str, function: str = "") -> str:
        found = [
            title
            for title, exprs in expressions.items()
            if any(metric in e and function in e for e in exprs)
        ]
        assert found, f"no panel queries {function} {metric}"
        return found[0]

    panel_using("llm_tier_requests_total", "rate(")
    panel_using("llm_model_selections_total", "rate(")
    panel_using("llm_provider_failures_total")
    panel_using("llm_model_retries_total")
    panel_using("llm_tier_unavailable_total")
    panel_using("llm_backend_errors_total")
    panel_using("llm_config_refreshes_total")
    cost_panel = panel_using("llm_cost_usd_total", "increase(")
    assert any("by (tier)" in e for e in expressions[cost_panel])
    health_title = panel_using("llm_provider_health")
    [health_panel] = [p for p in panels if p.get("title") == health_title]
    assert health_panel["type"] in ("state-timeline", "stat", "status-history")
    latency = panel_using("llm_request_duration_seconds_bucket", "histogram_quantile(")
    quantiles = set()
    for expr in expressions[latency]:
        match = re.match(r"\s*histogram_quantile\(\s*(0\.\d+)\s*,", expr)
        assert match, expr
        quantiles.add(match.group(1))
        assert re.search(r"by \((le, tier|tier, le)\)", expr), expr
        assert "rate(llm_request_duration_seconds_bucket" in expr
    assert quantiles == {"0.5", "0.95", "0.99"}

    # Every metric any query names is one the middleware exposes (default namespace "llm").
    registry = CollectorRegistry()
    mw = TierRoutingMiddleware(FakeLLM(), config=CONFIG, routes=[CHAT], registry=registry)
    assert generate_latest(registry) == b""  # building one changes no registry ...
    anyio.run(call, mw, b'{"tier": "simple", "messages": []}')  # ... its first call does
    exposed = exposed_names(generate_latest(registry).decode())
    assert referenced <= exposed  # the variables' metrics
    for title, exprs in expressions.items():
        for expr in exprs:
            names = promql_metric_names(expr)
            assert names, f"{title}: no metric in {expr!r}"
            unknown = names - exposed
            assert not unknown, f"{title}: {sorted(unknown)} are not exposed"
            referenced |= names
    assert {
        "llm_tier_requests_total",
        "llm_model_selections_total",
        "llm_provider_failures_total",
        "llm_provider_health",
        "llm_model_retries_total",
        "llm_tier_unavailable_total",
        "llm_cost_usd_total",
        "llm_request_duration_seconds_bucket",
        "llm_backend_errors_total",
        "llm_config_refreshes_total",
    } <= referenced
