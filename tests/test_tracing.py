"""OpenTelemetry spans: the routing span and one span per attempt, under the server span.

A real FastAPI app instrumented with `opentelemetry-instrumentation-fastapi`, whose endpoint calls
a fake provider with the real `openai` SDK through `UpstreamTransport`, traced by the real SDK's
TracerProvider (passed explicitly: the global one can be set only once per process) into its
in-memory exporter.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import httpx2
import openai
import pytest
from fastapi import FastAPI, Request
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.httpx import AsyncOpenTelemetryTransport
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry
from starlette.responses import JSONResponse, Response

from _clock import FakeClock
from configs import real_names
from llm_provider import CHAT, FakeProvider, poison
from samples import scrape, value
from tier_middleware import (
    HealthConfig,
    HealthTracker,
    RetryConfig,
    TierRoutingMiddleware,
    UpstreamTransport,
)
from tier_middleware._exchange import Exchange
from tier_middleware._tracing import SCHEMA_URL, TracedExchange

pytestmark = pytest.mark.anyio

SECRET = "the prompt text, never exported"


class Traced:
    def __init__(
        self,
        client: httpx.AsyncClient,
        exporter: InMemorySpanExporter,
        health: HealthTracker,
        registry: CollectorRegistry,
        provider: FakeProvider,
    ) -> None:
        self.client = client
        self.exporter = exporter
        self.health = health
        self.registry = registry
        self.provider = provider

    async def chat(self, tier: str = "simple", prompt: str = SECRET, **fields: Any) -> Any:
        body = {"tier": tier, "messages": [{"role": "user", "content": prompt}], **fields}
        return await self.client.post(CHAT, json=body)

    def spans(self) -> dict[str, list[ReadableSpan]]:
        """Finished spans by name."""
        out: dict[str, list[ReadableSpan]] = {}
        for span in self.exporter.get_finished_spans():
            out.setdefault(span.name, []).append(span)
        return out

    def tree(self) -> tuple[ReadableSpan, ReadableSpan, list[ReadableSpan]]:
        """(server span, routing span, attempt spans in order), checking their parentage."""
        finished = self.exporter.get_finished_spans()
        [server] = [s for s in finished if s.kind is SpanKind.SERVER]
        [routing] = [s for s in finished if s.name.startswith("tier_routing")]
        attempts = sorted(
            (s for s in finished if s.name.startswith("chat ")),
            key=lambda s: s.attributes["tier.attempt"],  # type: ignore[index]
        )
        assert parent_of(routing) == span_id(server)
        for attempt in attempts:
            assert parent_of(attempt) == span_id(routing)
            assert attempt.context is not None
            assert server.context is not None
            assert attempt.context.trace_id == server.context.trace_id
        return server, routing, attempts


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def parent_of(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def traced_app(transport: Any, server_tracing: TracerProvider, **middleware: Any) -> FastAPI:
    client = openai.AsyncOpenAI(
        api_key="sk-placeholder",
        base_url="http://placeholder/v1",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=transport),
    )
    app = FastAPI()

    @app.post(CHAT)
    async def chat(request: Request) -> Response:
        body = await request.json()
        reply = await client.chat.completions.create(model=body["model"], messages=body["messages"])
        return JSONResponse(reply.model_dump())

    app.add_middleware(TierRoutingMiddleware, config=real_names(), routes=[CHAT], **middleware)
    FastAPIInstrumentor.instrument_app(app, tracer_provider=server_tracing)
    return app


@asynccontextmanager
async def traced(
    provider: FakeProvider | None = None, *, tracer_provider: Any = None, **options: Any
) -> AsyncIterator[Traced]:
    provider = provider or FakeProvider()
    exporter = InMemorySpanExporter()
    server_tracing = TracerProvider()
    server_tracing.add_span_processor(SimpleSpanProcessor(exporter))
    if tracer_provider is None:
        tracer_provider = server_tracing
    health = HealthTracker(HealthConfig(), clock=FakeClock())
    registry = CollectorRegistry()
    transport = UpstreamTransport(httpx2.MockTransport(provider.handler))
    app = traced_app(
        transport,
        server_tracing,
        tracer_provider=tracer_provider,
        health=health,
        registry=registry,
        rng=random.Random(1),
        **options,
    )
    asgi = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=asgi, base_url="http://service") as client:
        yield Traced(client, exporter, health, registry, provider)
    await transport.aclose()


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def no_request_text(spans: Any, *texts: str) -> None:
    """No attribute value and no span name holds any of `texts` (request input)."""
    for span in spans:
        for text in texts:
            assert text not in span.name
            for v in (span.attributes or {}).values():
                assert text not in str(v), (span.name, v)


# -- the span tree ------------------------------------------------------------------------------


async def test_a_success_is_a_routing_span_and_one_chat_span_under_the_server_span() -> None:
    seen: list[Any] = []
    provider = FakeProvider()
    handler = provider.handler

    async def recording(request: httpx2.Request) -> httpx2.Response:
        seen.append(trace.get_current_span().get_span_context())  # what the provider call sees
        return await handler(request)

    provider.handler = recording  # type: ignore[method-assign]
    async with traced(provider) as t:
        response = await t.chat(extra_field="input never exported")
        assert response.status_code == 200
        _, routing, [attempt] = t.tree()
    assert routing.name == "tier_routing simple"
    assert routing.kind is SpanKind.INTERNAL
    assert attrs(routing) == {
        "tier.name": "simple",
        "tier.attempts": 1,
        "http.response.status_code": 200,
    }
    assert routing.status.status_code is StatusCode.UNSET
    model = response.headers["x-tier-model"]
    assert attempt.name == f"chat {model}"
    assert attempt.kind is SpanKind.CLIENT
    assert attrs(attempt) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": response.headers["x-tier-provider"],
        "gen_ai.request.model": model,
        "gen_ai.response.model": model,
        "gen_ai.usage.input_tokens": 5,
        "gen_ai.usage.output_tokens": 2,
        "tier.name": "simple",
        "tier.attempt": 1,
        "tier.verdict": "success",
    }
    assert attempt.instrumentation_scope is not None
    assert attempt.instrumentation_scope.schema_url == SCHEMA_URL
    # The attempt span was the current span while the app called the provider.
    assert seen == [attempt.context]
    no_request_text(t.exporter.get_finished_spans(), SECRET, "input never exported")


async def test_a_retry_is_two_chat_spans_the_first_failed_the_second_says_why() -> None:
    provider = FakeProvider()
    provider.rules.append(lambda m, p: 503 if len(provider.hits) == 1 else None)
    async with traced(provider) as t:
        response = await t.chat()
        assert response.status_code == 200
        _, routing, [first, second] = t.tree()
    assert attrs(routing)["tier.attempts"] == 2
    failed, served = attrs(first), attrs(second)
    assert failed["gen_ai.request.model"] != served["gen_ai.request.model"]
    assert failed["tier.verdict"] == "model_failure"
    assert failed["error.type"] == "InternalServerError"  # openai's error for a 5xx
    assert failed["tier.retried"] is True
    assert first.status.status_code is StatusCode.ERROR
    assert "gen_ai.usage.input_tokens" not in failed
    assert served["tier.attempt"] == 2
    assert served["tier.verdict"] == "success"
    assert served["tier.retry_reason"] == "InternalServerError"
    assert "error.type" not in served
    assert second.status.status_code is StatusCode.UNSET
    assert (first.end_time or 0) <= (second.start_time or 0)


async def test_a_caller_error_is_one_attempt_judged_the_callers() -> None:
    provider = FakeProvider()
    provider.rules.append(lambda m, p: 400)
    async with traced(provider) as t:
        response = await t.chat()
        assert response.status_code == 500  # the app let the SDK's BadRequestError escape
        _, routing, [attempt] = t.tree()
    assert attrs(attempt)["tier.verdict"] == "caller_error"
    assert attrs(attempt)["error.type"] == "BadRequestError"
    assert "tier.retried" not in attrs(attempt)
    # The exception went through the middleware (the 500 is answered outside it).
    assert attrs(routing)["error.type"] == "BadRequestError"
    assert routing.status.status_code is StatusCode.ERROR


async def test_a_poison_request_is_marked_suspect_and_its_repeat_is_not_retried() -> None:
    provider = FakeProvider()
    provider.rules.append(poison(SECRET))
    async with traced(provider) as t:
        first = await t.chat()
        assert first.status_code == 500
        _, routing, attempts = t.tree()
        # Failed on both models: it becomes a suspect; its failures are still evidence.
        assert [attrs(a)["tier.verdict"] for a in attempts] == ["model_failure"] * 2
        assert attrs(routing)["tier.suspect"] is True
        t.exporter.clear()
        again = await t.chat()
        assert again.status_code == 500
        _, routing, [attempt] = t.tree()
    # A known suspect: one attempt, its failure released uncounted.
    assert attrs(attempt)["tier.verdict"] == "suspect"
    assert attrs(attempt)["error.type"] == "InternalServerError"
    assert attrs(routing)["tier.suspect"] is True
    assert attrs(routing)["tier.attempts"] == 1
    samples = scrape(t.registry)
    assert value(samples, "llm_suspect_requests_total", tier="simple") == 2


async def test_the_503_short_circuit_is_a_routing_span_with_its_retry_after() -> None:
    async with traced() as t:
        for model in ("gpt-4o-mini", "gemini-2.0-flash"):
            t.health.record_failure("openai" if model.startswith("gpt") else "google", model)
        response = await t.chat()
        assert response.status_code == 503
        _, routing, attempts = t.tree()
    assert attempts == []
    assert attrs(routing) == {
        "tier.name": "simple",
        "tier.attempts": 0,
        "http.response.status_code": 503,
        "tier.retry_after": 30,
        "tier.unavailable": True,
        "error.type": "tier_unavailable",
    }
    assert routing.status.status_code is StatusCode.ERROR
    assert response.headers["retry-after"] == "30"


async def test_a_request_without_a_valid_tier_has_no_routing_span() -> None:
    async with traced() as t:
        unknown = await t.chat(tier="not-a-tier-of-ours")
        assert unknown.status_code == 400
        untiered = await t.client.post(
            CHAT, json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert untiered.status_code == 200  # not routed: passed on as it is
    names = [s.name for s in t.exporter.get_finished_spans()]
    assert not [n for n in names if n.startswith(("tier_routing", "chat "))]
    no_request_text(t.exporter.get_finished_spans(), "not-a-tier-of-ours")


async def test_the_httpx_instrumentations_span_nests_under_the_attempt_span() -> None:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))

    def handler(request: httpx.Request) -> httpx.Response:
        model = json.loads(request.content)["model"]
        return httpx.Response(200, json={"model": model, "usage": {"prompt_tokens": 3}})

    upstream = UpstreamTransport(httpx.MockTransport(handler))
    client = httpx.AsyncClient(
        transport=AsyncOpenTelemetryTransport(upstream, tracer_provider=tracer_provider)
    )
    app = FastAPI()

    @app.post(CHAT)
    async def chat(request: Request) -> Response:
        reply = await client.post(
            "http://provider.test/v1/chat/completions", json=await request.json()
        )
        return JSONResponse(reply.json())

    app.add_middleware(
        TierRoutingMiddleware,
        config=real_names(),
        routes=[CHAT],
        registry=CollectorRegistry(),
        tracer_provider=tracer_provider,
    )
    FastAPIInstrumentor.instrument_app(app, tracer_provider=tracer_provider)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://s") as c:
        response = await c.post(CHAT, json={"tier": "moderate", "messages": []})
    await client.aclose()
    assert response.status_code == 200
    finished = exporter.get_finished_spans()
    [attempt] = [s for s in finished if s.name == "chat gpt-4o"]
    [call] = [s for s in finished if s.kind is SpanKind.CLIENT and s is not attempt]
    assert parent_of(call) == span_id(attempt)
    assert attrs(attempt)["gen_ai.response.model"] == "gpt-4o"


# -- tracing errors and tracing off -------------------------------------------------------------


class RaisingTracer:
    def __init__(self, where: str) -> None:
        self.where = where
        self.real = TracerProvider().get_tracer("x")

    def start_span(self, name: str, **kwargs: Any) -> Any:
        if self.where == "start" or (self.where == "chat" and name.startswith("chat ")):
            raise RuntimeError("tracer bug")
        span = self.real.start_span(name, **kwargs)
        if self.where == "end":
            span.set_attributes = self.fail  # type: ignore[method-assign]
        return span

    @staticmethod
    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("tracer bug")


class RaisingProvider:
    def __init__(self, where: str) -> None:
        self.where = where

    def get_tracer(self, *args: Any, **kwargs: Any) -> Any:
        if self.where == "get_tracer":
            raise RuntimeError("tracer bug")
        return RaisingTracer(self.where)


@pytest.mark.parametrize("where", ["get_tracer", "start", "chat", "end"])
async def test_a_tracer_that_raises_never_fails_a_request_and_is_counted(where: str) -> None:
    provider = FakeProvider()
    provider.rules.append(lambda m, p: 503 if len(provider.hits) == 1 else None)  # a retry too
    async with traced(provider, tracer_provider=RaisingProvider(where)) as t:
        for _ in range(3):
            response = await t.chat()
            assert response.status_code == 200
            assert response.json()["choices"][0]["message"]["content"] == "hi"
        assert trace.get_current_span() is trace.INVALID_SPAN  # no context left attached
    errors = value(scrape(t.registry), "llm_tracing_errors_total")
    # start: the routing span fails at each attempt and at the end (3 for the retried request).
    expected = {"get_tracer": 1, "start": 7, "chat": 4, "end": 3}[where]
    assert errors == expected


def test_without_a_tracer_provider_requests_are_plain_exchanges() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    registry = CollectorRegistry()
    off = TierRoutingMiddleware(app, config=real_names(), registry=registry)
    assert off.exchange_type is Exchange  # the global provider is the API's proxy: not set
    noop = trace.NoOpTracerProvider()
    assert (
        TierRoutingMiddleware(
            app, config=real_names(), registry=registry, tracer_provider=noop
        ).exchange_type
        is Exchange
    )
    on = TierRoutingMiddleware(
        app, config=real_names(), registry=registry, tracer_provider=TracerProvider()
    )
    assert on.exchange_type is TracedExchange


def test_a_global_provider_set_during_lifespan_startup_is_used() -> None:
    code = """
import asyncio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from tier_middleware import TierRoutingMiddleware
from tier_middleware._tracing import TracedExchange

async def app(scope, receive, send):
    await receive()
    trace.set_tracer_provider(TracerProvider())
    await send({"type": "lifespan.startup.complete"})

async def main():
    mw = TierRoutingMiddleware(app, config={"tier_order": ["simple"], "tiers": {"simple": [{"provider": "p", "model": "m", "relative_cost": 1}]}})
    before = mw.exchange_type
    async def receive():
        return {"type": "lifespan.startup"}
    async def send(message):
        pass
    await mw({"type": "lifespan"}, receive, send)
    print(before.__name__, mw.exchange_type is TracedExchange)

asyncio.run(main())
"""
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["Exchange", "True"]


def test_the_package_routes_without_opentelemetry_installed() -> None:
    code = """
import asyncio, sys
for name in ("opentelemetry", "opentelemetry.trace", "opentelemetry.context"):
    sys.modules[name] = None
from tier_middleware import TierRoutingMiddleware

async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})

async def main():
    mw = TierRoutingMiddleware(app, config={"tier_order": ["simple"], "tiers": {"simple": [{"provider": "p", "model": "m", "relative_cost": 1}]}})
    sent = []
    body = b'{"tier": "simple"}'
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}
    async def send(message):
        sent.append(message)
    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""}
    await mw(scope, receive, send)
    print(type(mw).__name__, mw.exchange_type.__name__, sent[0]["status"])
    try:
        TierRoutingMiddleware(app, config={"tier_order": ["simple"], "tiers": {"simple": [{"provider": "p", "model": "m", "relative_cost": 1}]}},
                              tracer_provider=object())
    except ValueError as exc:
        print("otel" in str(exc))

asyncio.run(main())
"""
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["TierRoutingMiddleware", "Exchange", "200", "True"]


async def test_a_session_moved_up_a_tier_says_where_it_came_from() -> None:
    async with traced() as t:
        headers = {"x-session-id": "conversation-1"}
        first = await t.client.post(
            CHAT,
            json={"tier": "simple", "messages": [{"role": "user", "content": "hi"}]},
            headers=headers,
        )
        assert first.status_code == 200
        assert "tier.session.upgraded_from" not in attrs(t.tree()[1])
        t.exporter.clear()
        second = await t.client.post(
            CHAT,
            json={"tier": "moderate", "messages": [{"role": "user", "content": "hi"}]},
            headers=headers,
        )
        assert second.status_code == 200
        _, routing, [attempt] = t.tree()
    assert routing.name == "tier_routing moderate"
    assert attrs(routing)["tier.session.upgraded_from"] == "simple"
    assert attrs(attempt)["gen_ai.request.model"] == "gpt-4o"
    no_request_text(t.exporter.get_finished_spans(), "conversation-1")


async def test_an_attempt_that_timed_out_is_a_model_failure_with_error_type_timeout() -> None:
    provider = FakeProvider()
    provider.hold = 2  # the first call waits for a second one: it hangs until the retry comes
    async with traced(provider, retries=RetryConfig(attempt_timeout=0.2)) as t:
        response = await t.chat()
        assert response.status_code == 200
        _, _, [hung, served] = t.tree()
    assert attrs(hung)["tier.verdict"] == "model_failure"
    assert attrs(hung)["error.type"] == "TimeoutError"
    assert attrs(served)["tier.retry_reason"] == "TimeoutError"
    assert attrs(served)["tier.verdict"] == "success"
