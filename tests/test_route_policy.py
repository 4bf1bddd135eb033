"""`RoutePolicy(max_attempts=...)` above the default 2: a failed call is tried on one more model
per attempt, until a model answers, the attempts are used up, or the tier has no model left.

A real Starlette app answers 503 for the models it is told are down. The router draws the first
healthy model in config order (`FirstChoice`), so the order of the attempts is known.
"""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from configs import entry, one_tier
from tier_middleware import RoutePolicy, TierRoutingMiddleware

pytestmark = pytest.mark.anyio

CONFIG = one_tier(entry("openai", "a"), entry("anthropic", "b"), entry("google", "c"))


class FirstChoice(random.Random):
    """Always draws the first healthy model of a tier, in config order."""

    def random(self) -> float:
        return 0.0


class App:
    """A Starlette app behind the middleware; `down` models answer 503."""

    def __init__(self, max_attempts: int, down: set[str]) -> None:
        self.down = down
        self.calls: list[str] = []
        self.registry = CollectorRegistry()
        app = Starlette(routes=[Route("/chat", self.chat, methods=["POST"])])
        app.add_middleware(
            TierRoutingMiddleware,
            config=CONFIG,
            routes={"/chat": RoutePolicy(max_attempts=max_attempts)},
            registry=self.registry,
            rng=FirstChoice(),
        )
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        )

    async def chat(self, request: Request) -> JSONResponse:
        model = str((await request.json())["model"])
        self.calls.append(model)
        if model in self.down:
            return JSONResponse({"error": {"message": f"{model} is down"}}, status_code=503)
        return JSONResponse({"model": model})

    async def ask(self) -> httpx.Response:
        return await self.client.post("/chat", json={"tier": "simple"})

    def retries(self) -> list[tuple[str, str, float]]:
        return [
            (s.labels["failed_model"], s.labels["retry_model"], s.value)
            for m in self.registry.collect()
            for s in m.samples
            if s.name == "llm_model_retries_total"
        ]


@pytest.fixture
async def make() -> Any:
    built: list[App] = []

    def build(max_attempts: int, down: set[str]) -> App:
        app = App(max_attempts, down)
        built.append(app)
        return app

    yield build
    for app in built:
        await app.client.aclose()


async def test_three_attempts_get_past_two_failing_models(make: Any) -> None:
    app = make(3, {"a", "b"})
    response = await app.ask()
    assert response.status_code == 200
    assert (response.headers["x-tier-model"], response.headers["x-tier-attempts"]) == ("c", "3")
    assert app.calls == ["a", "b", "c"]
    assert sorted(app.retries()) == [("a", "b", 1.0), ("b", "c", 1.0)]
    # The request got past both failures: those were the models' faults, both are backed off.
    second = await app.ask()
    assert (second.headers["x-tier-model"], second.headers["x-tier-attempts"]) == ("c", "1")
    assert app.calls == ["a", "b", "c", "c"]


async def test_two_attempts_stop_at_the_second_failure(make: Any) -> None:
    app = make(2, {"a", "b"})
    response = await app.ask()
    assert response.status_code == 503  # the app's own answer, as it came
    assert response.json() == {"error": {"message": "b is down"}}
    assert response.headers["x-tier-attempts"] == "2"
    assert app.calls == ["a", "b"]


async def test_attempts_beyond_the_models_of_the_tier_end_when_none_is_left(make: Any) -> None:
    app = make(5, {"a", "b", "c"})
    response = await app.ask()
    assert response.status_code == 503
    assert response.json() == {"error": {"message": "c is down"}}
    assert response.headers["x-tier-attempts"] == "3"  # each model once, no fourth call
    assert app.calls == ["a", "b", "c"]


async def test_one_attempt_never_retries(make: Any) -> None:
    app = make(1, {"a"})
    response = await app.ask()
    assert (response.status_code, response.headers["x-tier-attempts"]) == (503, "1")
    assert app.calls == ["a"]
    assert app.retries() == []
