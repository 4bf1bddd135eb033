"""`tier-middleware demo`: simulated chat traffic through the middleware, offline and in memory.

Fake providers (one raw ASGI app, from `_fakes`) answer OpenAI-style completions with a usage
block, behind a `TierRoutingMiddleware` with a built-in three-tier config, its own Prometheus
registry, a seeded rng and a simulated clock for health. Requests go through
`httpx.ASGITransport`, one every `STEP` simulated seconds. One provider answers 503 during the
middle third of the run; backoff and half-open probes play out on the simulated clock, so it comes
back without a restart. `_report` renders what the run saw.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import httpx
from prometheus_client import CollectorRegistry

from .._config import TierConfig
from .._health import HealthConfig
from .._middleware import TierRoutingMiddleware
from .._routes import RoutePolicy
from ._fakes import MAX_TOKENS, PATH, Event, FakeProviders, RecordingTracker, SimClock, Traffic
from ._report import PHASES, ModelKey, Report, render

STEP = 0.5  # simulated seconds between two requests
DOWN = "anthropic"  # the provider that fails during the middle third
NAMESPACE = "llm"

# Prices are USD per million tokens, for illustration only.
DEMO_CONFIG: dict[str, Any] = {
    "version": "demo-1",
    "tier_order": ["simple", "moderate", "complex"],
    "tiers": {
        "simple": [
            {
                "provider": "openai",
                "model": "gpt-4o-mini",
                "relative_cost": 1,
                "input_price_per_million": 0.15,
                "output_price_per_million": 0.60,
            },
            {
                "provider": "google",
                "model": "gemini-2.0-flash",
                "relative_cost": 1,
                "input_price_per_million": 0.10,
                "output_price_per_million": 0.40,
            },
            {
                "provider": "anthropic",
                "model": "claude-3-5-haiku",
                "relative_cost": 2,
                "input_price_per_million": 0.80,
                "output_price_per_million": 4.00,
            },
        ],
        "moderate": [
            {
                "provider": "openai",
                "model": "gpt-4.1",
                "relative_cost": 5,
                "input_price_per_million": 2.00,
                "output_price_per_million": 8.00,
            },
            {
                "provider": "google",
                "model": "gemini-2.5-flash",
                "relative_cost": 2,
                "input_price_per_million": 0.30,
                "output_price_per_million": 2.50,
            },
            {
                "provider": "anthropic",
                "model": "claude-sonnet-4",
                "relative_cost": 4,
                "input_price_per_million": 3.00,
                "output_price_per_million": 15.00,
            },
        ],
        "complex": [
            {
                "provider": "openai",
                "model": "o3",
                "relative_cost": 8,
                "input_price_per_million": 2.00,
                "output_price_per_million": 8.00,
            },
            {
                "provider": "google",
                "model": "gemini-2.5-pro",
                "relative_cost": 6,
                "input_price_per_million": 1.25,
                "output_price_per_million": 10.00,
            },
            {
                "provider": "anthropic",
                "model": "claude-opus-4",
                "relative_cost": 20,
                "input_price_per_million": 15.00,
                "output_price_per_million": 75.00,
            },
        ],
    },
}

# Backoffs of 5, 10, 20, then 30 s (the cap): a 50 s outage is probed a few times, and a model
# is let back in by its first probe after the provider returns.
DEMO_HEALTH = HealthConfig(initial_backoff=5.0, max_backoff=30.0, multiplier=2.0)


def _selections(registry: CollectorRegistry, config: TierConfig) -> dict[ModelKey, float]:
    out: dict[ModelKey, float] = {}
    for tier in config.tier_order:
        for m in config.models(tier):
            labels = {"tier": tier, "provider": m.provider, "model": m.model}
            value = registry.get_sample_value(f"{NAMESPACE}_model_selections_total", labels)
            out[(tier, m.provider, m.model)] = value or 0.0
    return out


@contextmanager
def _quiet_logs() -> Iterator[None]:
    """The middleware logs every backoff as a warning; the demo shows them in its timeline."""
    log = logging.getLogger("tier_middleware")
    handler = logging.NullHandler()
    propagate = log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


async def simulate(seed: int, requests: int, out: TextIO | None = None) -> Report:
    """Send `requests` requests through the middleware; `out` gets a progress line if given."""
    config = TierConfig.load(DEMO_CONFIG)
    clock = SimClock()
    registry = CollectorRegistry()
    tracker = RecordingTracker(DEMO_HEALTH, clock, random.Random(f"{seed}:health"))
    providers = FakeProviders()
    middleware = TierRoutingMiddleware(
        providers,
        config=config,
        routes={PATH: RoutePolicy(require_tier=True)},
        health=tracker,
        registry=registry,
        metrics_namespace=NAMESPACE,
        rng=random.Random(f"{seed}:routing"),
        name="demo",
    )
    traffic = Traffic(random.Random(f"{seed}:traffic"), config.tier_order)
    down_index, up_index = requests // 3, 2 * requests // 3
    report = Report(
        seed,
        requests,
        STEP,
        config,
        DOWN,
        down_index * STEP,
        up_index * STEP,
        registry,
        NAMESPACE,
        tracker.events,
    )
    phases = iter(PHASES)
    phase = next(phases)
    before = _selections(registry, config)

    def close_phase() -> str:
        nonlocal before
        now = _selections(registry, config)
        report.phase_picks[phase] = {k: now[k] - before[k] for k in now}
        before = now
        return next(phases, phase)

    shown = 0  # the width of the progress line on screen
    transport = httpx.ASGITransport(app=middleware)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://demo") as client:
            for i in range(requests):
                if i == down_index:
                    phase = close_phase()
                    providers.down.add(DOWN)
                    tracker.events.append(Event(clock(), "down", DOWN))
                if i == up_index:
                    phase = close_phase()
                    providers.down.discard(DOWN)
                    tracker.events.append(Event(clock(), "up", DOWN))
                call = traffic.next()
                headers = {"x-session-id": call.session} if call.session else {}
                body = {
                    "tier": call.tier,
                    "max_tokens": MAX_TOKENS[call.tier],
                    "messages": [{"role": "user", "content": " ".join(["word"] * call.words)}],
                }
                response = await client.post(PATH, json=body, headers=headers)
                status = response.status_code
                report.statuses[status] = report.statuses.get(status, 0) + 1
                if int(response.headers.get("x-tier-attempts", "0")) > 1:
                    report.retried += 1
                if out is not None and (i % 10 == 9 or i == requests - 1):
                    state = f"{DOWN} down" if DOWN in providers.down else "all providers up"
                    line = f"  request {i + 1:>{len(str(requests))}}/{requests}  "
                    line += f"t={clock():.1f}s  {state}"
                    out.write("\r" + line.ljust(shown))
                    out.flush()
                    shown = len(line)
                clock.now += STEP
    finally:
        await middleware.aclose()
    if out is not None and shown:
        out.write("\r" + " " * shown + "\r")
        out.flush()
    close_phase()  # every phase has begun: down_index < up_index < requests, or all are 0
    report.conversations = traffic.started
    return report


def run_demo(*, seed: int = 7, requests: int = 300, out: TextIO) -> int:
    progress = out if out.isatty() else None
    with _quiet_logs():
        report = asyncio.run(simulate(seed, requests, progress))
    out.write("\n".join(render(report)) + "\n")
    return 0


__all__ = ["DEMO_CONFIG", "run_demo", "simulate"]
