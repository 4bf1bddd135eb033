#!/usr/bin/env python
"""Benchmark: what OpenTelemetry tracing adds to a routed request, in process.

The app and request of ``bench/middleware.py`` (a Starlette chat endpoint behind
TierRoutingMiddleware, a ~4 KB body routed and rewritten), in three variants:

* ``off``      -- no tracer provider set (the API's default proxy): tracing costs one lookup.
* ``on``       -- an SDK ``TracerProvider`` with no span processor: our spans are built and
                  recorded, and go nowhere.
* ``exported`` -- the same with a ``SimpleSpanProcessor`` into an in-memory exporter (cleared
                  after each batch): the cost a test or a synchronous exporter sees.

Median microseconds per request over several repeats, variants interleaved. Needs the `otel`
extra and opentelemetry-sdk. Run from the repository root with the project's venv active:

    python bench/tracing.py            # about 20 s
    python bench/tracing.py --quick
"""

from __future__ import annotations

import os
import sys

# `python bench/tracing.py` puts bench/ first on sys.path: move it last (see middleware.py).
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.append(sys.path.pop(0))

import argparse
import asyncio
import gc
import statistics
import time
from typing import Any

import _apps as mb  # bench/_apps.py: middleware.py's app, config and request
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route

from tier_middleware import TierRoutingMiddleware

VARIANTS = ("off", "on", "exported")


def build(variant: str, exporter: InMemorySpanExporter) -> Any:
    options: dict[str, Any] = {"config": mb.CONFIG, "routes": [mb.CHAT_PATH]}
    if variant != "off":
        provider = TracerProvider()
        if variant == "exported":
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        options["tracer_provider"] = provider
    routes = [Route(mb.CHAT_PATH, mb.chat, methods=["POST"])]
    return Starlette(routes=routes, middleware=[Middleware(TierRoutingMiddleware, **options)])


def runner(variant: str) -> Any:
    exporter = InMemorySpanExporter()
    app = build(variant, exporter)
    body = mb.body_for("middleware")
    template = mb.scope_template(body)
    request = {"type": "http.request", "body": body, "more_body": False}
    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    def receiver() -> Any:
        pending = [request]

        async def receive() -> dict[str, Any]:
            return pending.pop() if pending else {"type": "http.disconnect"}

        return receive

    async def run(n: int) -> None:
        for _ in range(n):
            await app(dict(template), receiver(), send)
        exporter.clear()
        assert set(statuses) == {200}, set(statuses)
        statuses.clear()

    return run


async def main(iterations: int, repeats: int) -> None:
    runs = {v: runner(v) for v in VARIANTS}
    for run in runs.values():
        await run(500)
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(repeats):
        for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            gc.collect()
            t0 = time.perf_counter_ns()
            await runs[v](iterations)
            samples[v].append((time.perf_counter_ns() - t0) / iterations / 1000.0)
    off = statistics.median(samples["off"])
    for v in VARIANTS:
        median = statistics.median(samples[v])
        print(f"  {v:<9} {median:7.2f} us/req  (+{median - off:5.2f} vs off)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    iterations, repeats = (2000, 5) if args.quick else (5000, 9)
    asyncio.run(main(iterations, repeats))
