"""(a) In process: each variant's ASGI app called directly with a hand-built scope, receive and
send (no network); microseconds per request, variants interleaved."""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from _apps import ROUTED, VARIANTS, body_for, build_app, scope_template
from _support import SIMPLE_MODELS, run_loop


def make_runner(variant: str) -> Callable[[int], Any]:
    """An async function running `n` requests against the variant's app, sequentially."""
    app = build_app(variant)
    body = body_for(variant)
    template = scope_template(body)
    request_message = {"type": "http.request", "body": body, "more_body": False}
    disconnect = {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        return None

    def receiver() -> Callable[[], Any]:
        pending = [request_message]

        async def receive() -> dict[str, Any]:
            return pending.pop() if pending else disconnect

        return receive

    async def run(n: int) -> None:
        for _ in range(n):
            await app(dict(template), receiver(), send)

    return run


async def check_in_process(variant: str) -> None:
    """One request with the responses captured: the variant does what it claims."""
    app = build_app(variant)
    body = body_for(variant)
    sent: list[dict[str, Any]] = []
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return pending.pop() if pending else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope_template(body), receive, send)
    start, reply = sent[0], sent[1]
    headers = dict(start["headers"])
    model = json.loads(reply["body"])["model"]
    assert start["status"] == 200, (variant, start)
    if variant in ROUTED:
        assert headers.get(b"x-tier") == b"simple", headers
        assert model in SIMPLE_MODELS, model
    else:
        assert b"x-tier" not in headers, headers
        assert model == "gpt-4o-mini", model


def in_process(iterations: int, repeats: int, warmup: int) -> dict[str, float]:
    """Median (and min) us/request per variant; repeats interleave the variants to share drift."""

    async def main() -> dict[str, float]:
        runners = {}
        for v in VARIANTS:
            await check_in_process(v)
            runners[v] = make_runner(v)
            await runners[v](warmup)
        samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(repeats):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            for v in order:
                gc.collect()
                t0 = time.perf_counter_ns()
                await runners[v](iterations)
                samples[v].append((time.perf_counter_ns() - t0) / iterations / 1000.0)
        for v in VARIANTS:
            shown = " ".join(f"{s:.2f}" for s in samples[v])
            print(f"  {v:<12} samples (us/req): {shown}")
        medians = {v: statistics.median(samples[v]) for v in VARIANTS}
        mins = {f"{v}_min": min(samples[v]) for v in VARIANTS}
        return {**medians, **mins}

    return run_loop(main())
