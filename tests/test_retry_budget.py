"""The retry budget: retries in flight stay within max(min, ratio x requests in flight)."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry

from asgi_harness import call
from configs import entry, one_tier
from tier_middleware import HealthConfig, RetryConfig, TierRoutingMiddleware
from tier_middleware._budget import RetryBudget

pytestmark = pytest.mark.anyio

# "flaky" is drawn first every time (its weight dwarfs the other), fails at once and, with a
# high threshold, stays in rotation; "slow" answers retries only when the test lets it.
CONFIG = one_tier(entry("a", "flaky", weight=1e9), entry("b", "slow", weight=1e-9))


class App:
    def __init__(self) -> None:
        self.release = anyio.Event()
        self.calls: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await receive()
        model = dict(scope["headers"])[b"x-tier-model"].decode()
        self.calls.append(model)
        if model == "slow":
            await self.release.wait()
        status = 503 if model == "flaky" else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps({"m": model}).encode()})


async def burst(**budget: Any) -> tuple[list[Any], App, CollectorRegistry, TierRoutingMiddleware]:
    app = App()
    registry = CollectorRegistry()
    mw = TierRoutingMiddleware(
        app,
        config=CONFIG,
        routes=["/chat"],
        health=HealthConfig(failure_threshold=10**6),
        registry=registry,
        **budget,
    )
    results: list[Any] = []

    async def one() -> None:
        body = json.dumps({"tier": "simple"}).encode()
        results.append(await call(mw, body, path="/chat"))

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(one)
        with anyio.fail_after(5):
            await anyio.wait_all_tasks_blocked()  # every retry is waiting on the slow model
        app.release.set()
    return results, app, registry, mw


async def test_retries_in_flight_are_capped_and_the_rest_get_the_failure_as_it_came() -> None:
    results, app, registry, mw = await burst()
    statuses = sorted(r.status for r in results)
    # With 10 requests in flight, 20% would be 2: the minimum of 3 concurrent retries applies.
    assert app.calls.count("slow") == 3
    assert statuses == [200] * 3 + [503] * 7
    over = [r for r in results if r.status == 503]
    assert all(r.json() == {"m": "flaky"} for r in over)  # the app's own failure, unchanged
    assert all(r.headers["x-tier-attempts"] == "1" for r in over)
    assert registry.get_sample_value("llm_retries_over_budget_total", {"tier": "simple"}) == 7
    assert (mw.budget.active, mw.budget.retrying) == (0, 0)  # every slot was given back


async def test_the_budget_is_configurable() -> None:
    _, app, _, _ = await burst(retries=RetryConfig(budget=0.0, budget_min=1))
    assert app.calls.count("slow") == 1
    unlimited, app, _, _ = await burst(retries=RetryConfig(budget=10.0))
    assert app.calls.count("slow") == 10
    assert all(r.status == 200 for r in unlimited)


def test_budget_arithmetic() -> None:
    budget = RetryBudget(ratio=0.2, min_concurrency=3)
    budget.active = 100
    taken = 0
    while budget.try_retry():
        taken += 1
    assert taken == 20
    budget.done()
    assert budget.try_retry()
    with pytest.raises(ValueError, match="retry_budget"):
        RetryBudget(ratio=-1)
