"""A model's health reflects the model, never the request: the figures of the attribution rules,
through real Starlette and FastAPI apps whose endpoint calls a fake provider with the real
`openai` (and `anthropic`) SDK, once unmapped (SDK exceptions propagate) and once mapped (the
endpoint answers the provider's status).

Time moves only through the FakeClock given to the HealthTracker; draws are seeded.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry

from _clock import FakeClock
from configs import entry, real_names
from llm_provider import CHAT, FakeProvider, every_model, fails, poison, sdk_app
from redis_server import RedisServer
from samples import Samples, scrape, total, value
from tier_middleware import HealthConfig, HealthTracker

pytestmark = pytest.mark.anyio

CONFIG = real_names(more={"simple": [entry("mistral", "mistral-small")]})
SIMPLE = ["gpt-4o-mini", "gemini-2.0-flash", "mistral-small"]
PROVIDER = {"gpt-4o-mini": "openai", "gemini-2.0-flash": "google", "mistral-small": "mistral"}
VARIANTS = [
    pytest.param(framework, mapped, id=f"{framework}-{'mapped' if mapped else 'unmapped'}")
    for framework in ("starlette", "fastapi")
    for mapped in (False, True)
]


class Stack:
    def __init__(
        self, provider: FakeProvider, health: HealthTracker, registry: CollectorRegistry
    ) -> None:
        self.provider = provider
        self.health = health
        self.clock: FakeClock = health.clock  # type: ignore[assignment]
        self.registry = registry
        self.client: httpx.AsyncClient

    async def chat(self, prompt: str, tier: str = "simple") -> httpx.Response:
        body = {"model": f"tier:{tier}", "messages": [{"role": "user", "content": prompt}]}
        return await self.client.post(CHAT, json=body)

    def samples(self) -> Samples:
        return scrape(self.registry)

    def backed_off(self) -> set[str]:
        return {model for _, model, _ in self.health.unavailable()}


@asynccontextmanager
async def stack(
    framework: str = "fastapi",
    mapped: bool = False,
    *,
    health: HealthConfig | None = None,
    seed: int = 3,
    config: dict[str, Any] = CONFIG,
    provider: FakeProvider | None = None,
    **options: Any,
) -> AsyncIterator[Stack]:
    provider = provider or FakeProvider()
    tracker = HealthTracker(health or HealthConfig(), clock=FakeClock())
    registry = CollectorRegistry()
    app = sdk_app(
        framework,
        provider,
        mapped=mapped,
        config=config,
        health=tracker,
        registry=registry,
        rng=random.Random(seed),
        **options,
    )
    s = Stack(provider, tracker, registry)
    # An unmapped SDK exception reaches the server as a 500: the client sees that, not a raise.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
        s.client = client
        yield s


# -- a) a poison request --------------------------------------------------------------------------


@pytest.mark.parametrize(("framework", "mapped"), VARIANTS)
async def test_a_poison_body_sent_six_times_backs_off_no_model(
    framework: str, mapped: bool
) -> None:
    async with stack(framework, mapped) as s:
        s.provider.rules.append(poison("make every model fail"))
        for n in range(6):
            response = await s.chat("make every model fail")
            assert response.status_code == 500  # the provider's own failure, as it came
            # The first time it is retried once; after failing on two models it is a suspect.
            assert len(s.provider.hits) == (2 if n == 0 else n + 2)
            if mapped:  # (unmapped, the server's own 500 carries no header of ours)
                assert response.headers["x-tier-attempts"] == ("2" if n == 0 else "1")
        assert s.backed_off() == set()

        for n in range(20):
            assert (await s.chat(f"an ordinary question {n}")).status_code == 200
        samples = s.samples()
    assert s.backed_off() == set()
    assert total(samples, "llm_provider_failures_total") == 0
    assert value(samples, "llm_suspect_requests_total", tier="simple") == 6


# -- b) caller errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(("framework", "mapped"), VARIANTS)
@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
async def test_requests_the_provider_rejects_with_400_are_the_callers(
    framework: str, mapped: bool, sdk: str
) -> None:
    async with stack(framework, mapped, sdk=sdk) as s:
        s.provider.rules.append(lambda model, prompt: 400 if prompt.startswith("long") else None)
        for n in range(5):
            response = await s.chat(f"long prompt {n}")
            assert response.status_code == (400 if mapped else 500)
            assert len(s.provider.hits) == n + 1
        samples = s.samples()
    assert len(s.provider.hits) == 5  # no retry on another model
    assert s.backed_off() == set()
    assert all(s.health.status(PROVIDER[m], m).unconfirmed_failures == 0 for m in SIMPLE)
    assert total(samples, "llm_caller_errors_total", tier="simple") == 5
    assert total(samples, "llm_provider_failures_total") == 0


# -- c) one sick model ----------------------------------------------------------------------------


@pytest.mark.parametrize(("framework", "mapped"), VARIANTS)
@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
async def test_one_failing_model_is_backed_off_after_its_first_failure(
    framework: str, mapped: bool, sdk: str
) -> None:
    async with stack(framework, mapped, sdk=sdk) as s:
        s.provider.rules.append(fails("gemini-2.0-flash", 503))
        for n in range(20):
            response = await s.chat(f"question {n}")
            assert response.status_code == 200
        samples = s.samples()
    hits = Counter(s.provider.hits)
    assert hits["gemini-2.0-flash"] == 1  # its one failure was retried, then it was left alone
    assert s.backed_off() == {"gemini-2.0-flash"}
    assert (
        value(samples, "llm_provider_failures_total", provider="google", model="gemini-2.0-flash")
        == 1
    )


# -- d) every model sick ------------------------------------------------------------------------


@pytest.mark.parametrize(("framework", "mapped"), VARIANTS)
async def test_when_every_model_fails_the_tier_answers_503_within_eight_requests(
    framework: str, mapped: bool
) -> None:
    async with stack(framework, mapped) as s:
        s.provider.rules.append(every_model(502))
        first_503 = None
        for n in range(8):
            response = await s.chat(f"question {n}")
            if response.status_code == 503:
                first_503 = n
                break
            assert response.status_code == (502 if mapped else 500)
        assert first_503 is not None, "the tier never went unavailable"
        assert response.json()["error"]["code"] == "service_unavailable"
        assert 1 <= int(response.headers["retry-after"]) <= 30
        assert s.backed_off() == set(SIMPLE)

        # No provider call until a backoff ends.
        hits = len(s.provider.hits)
        for n in range(5):
            assert (await s.chat(f"later question {n}")).status_code == 503
        assert len(s.provider.hits) == hits

        # The provider heals; when the backoffs end, a probe gets through.
        s.provider.rules.clear()
        s.clock.advance(30.0)
        assert (await s.chat("after the outage")).status_code == 200
        assert len(s.provider.hits) == hits + 1


# -- failure bursts -------------------------------------------------------------------------------

BURST_CONFIG = real_names(flash_cost=3)


async def test_a_burst_failing_together_is_one_step_and_the_model_is_probed_after_it() -> None:
    cfg = HealthConfig(initial_backoff=1.0, max_backoff=60.0)
    async with stack(health=cfg, config=BURST_CONFIG) as s:
        s.provider.rules.append(fails("gpt-4o-mini", 503))
        s.provider.hold = 40  # every first attempt is in flight before any answers
        s.provider.on_release = lambda: s.clock.advance(0.5)  # ... which took half a second

        async def one(n: int) -> None:
            assert (await s.chat(f"burst {n}")).status_code in (200, 500)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for n in range(40):
                    tg.start_soon(one, n)
        failed_together = Counter(s.provider.hits[:40])["gpt-4o-mini"]
        assert failed_together >= 25  # (seeded) weights 3:1 for mini
        state = s.health.status("openai", "gpt-4o-mini")
        assert (state.state, state.consecutive_failures) == ("backoff", 1)
        assert state.backoff_remaining == pytest.approx(1.0)  # the first step, not 2**28 s

        # When the first step ends, the model is probed (and, healed, back in rotation).
        s.provider.rules.clear()
        s.provider.hold = 0
        s.clock.advance(1.0)
        assert s.health.status("openai", "gpt-4o-mini").state == "probing"
        for n in range(20):
            assert (await s.chat(f"after {n}")).status_code == 200
        assert "gpt-4o-mini" in s.provider.hits[40 + failed_together :]
        assert s.health.status("openai", "gpt-4o-mini").state == "available"


@pytest.mark.redis
async def test_instances_failing_together_step_the_shared_backoff_once(
    redis_server: RedisServer,
) -> None:
    """Two instances on one Redis with shared health; a burst fails on both at once."""
    cfg = HealthConfig(initial_backoff=1.0, max_backoff=60.0)
    # The step is counted in Redis: a write timed out on a busy machine (30 at once, default
    # 0.1 s) would not be there to count, so the timeouts are generous here.
    redis_options = {"socket_timeout": 2.0, "connect_timeout": 2.0}
    options = {"redis_url": redis_server.url, "shared_health": True, "redis_options": redis_options}
    provider = FakeProvider()  # one provider behind both: 30 calls in flight, then they fail
    async with (
        stack(health=cfg, config=BURST_CONFIG, seed=1, provider=provider, **options) as a,
        stack(health=cfg, config=BURST_CONFIG, seed=2, provider=provider, **options) as b,
    ):
        a.provider.rules.append(fails("gpt-4o-mini", 503))
        a.provider.hold = 30
        a.provider.on_release = lambda: (a.clock.advance(0.5), b.clock.advance(0.5))

        async def one(s: Stack, n: int) -> None:
            assert (await s.chat(f"burst {n}")).status_code in (200, 500)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for n in range(15):
                    tg.start_soon(one, a, n)
                    tg.start_soon(one, b, 100 + n)
        assert Counter(a.provider.hits[:30])["gpt-4o-mini"] >= 15
        field = redis_server.command("HGET", "tier:health", "openai\ngpt-4o-mini")
        failures, until, since = field.decode().split(":")
        assert int(failures) == 1  # one step, fleet-wide
        assert float(until) - float(since) == pytest.approx(1.0)


# -- a provider 503 passed on while the tier is down ----------------------------------------------


@pytest.mark.parametrize("own", [None, "7"])
async def test_a_503_passed_on_while_the_tier_is_down_carries_a_retry_after(
    own: str | None,
) -> None:
    async with stack("fastapi", mapped=True) as s:
        s.provider.rules.append(fails("gpt-4o", 503))
        if own is not None:
            s.provider.failure_headers = {"retry-after": own}
        responses = [await s.chat(f"question {n}", tier="moderate") for n in range(3)]
    assert [r.status_code for r in responses] == [503, 503, 503]
    assert all(r.json()["message"] == "upstream failed with 503" for r in responses)  # its own
    if own is not None:  # the provider's own, as it came, and only that
        assert all(r.headers.get_list("retry-after") == [own] for r in responses)
        return
    # While the tier still had its model, nothing to promise; the third failure of a distinct
    # request backed it off: the 503 says when it comes back, as the middleware's own would.
    assert [r.headers.get("retry-after") for r in responses] == [None, None, "30"]
    assert responses[2].headers["retry-after-ms"] == "30000"
