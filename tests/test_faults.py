"""Fault injection under load: flaky providers, a failing Redis, a failing control plane, apps
that raise and clients that leave.

Every test here drives many concurrent requests through the middleware in process (the raw ASGI
harness of tests/asgi_harness.py) and checks three things: what each client got back, that no
request hung (every wait is bounded by anyio.fail_after), and that health and the Prometheus
counters tell exactly what happened. Health runs on a hand-driven clock wherever only the
middleware's own timing matters; real time appears only where the fault is real time itself
(Redis socket timeouts, a slow control plane, the state backend's cooldown).

tests/test_state.py, tests/test_config_manager.py and tests/test_retry_budget.py hold the
narrower, one-request-at-a-time versions of several scenarios; these are about load and faults.
"""

from __future__ import annotations

import collections
import gc
import json
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from prometheus_client import CollectorRegistry

from _clock import FakeClock
from asgi_harness import Client, Result, call, http_scope
from configs import entry, one_tier, two_per_tier
from control_plane import ControlPlane
from redis_server import Partition, RedisServer
from tier_middleware import (
    ControlPlaneSource,
    HealthConfig,
    HealthTracker,
    RetryConfig,
    TierRoutingMiddleware,
)

pytestmark = [pytest.mark.anyio, pytest.mark.faults]

ROUTE = "/v1/chat/completions"
JSON = ("content-type", "application/json")
PROVIDER_ERROR = b'{"error":{"code":"provider_overloaded","message":"try again later"}}'

# Two models per tier, equal weights: a retry always has somewhere to go.
CONFIG = two_per_tier("faults-1")
# Three models for the backoff-and-recovery run, so the tier is rarely down all at once.
WIDE_CONFIG = one_tier(
    entry("openai", "mini"), entry("anthropic", "haiku"), entry("google", "flash")
)
PROVIDER_OF = {
    m["model"]: m["provider"]
    for config in (CONFIG, WIDE_CONFIG)
    for models in config["tiers"].values()
    for m in models
}


# -- helpers ------------------------------------------------------------------------------------


def chat(tier: str = "simple", **fields: Any) -> bytes:
    body = {"tier": tier, "messages": [{"role": "user", "content": "hi"}], **fields}
    return json.dumps(body).encode()


def total(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The sum of a counter's samples over every label set matching `labels`."""
    return sum(
        sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def samples(registry: CollectorRegistry, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (sample.labels, sample.value)
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name == name
    ]


async def load(
    n: int, concurrency: int, one: Callable[[int], Awaitable[None]], deadline: float
) -> None:
    """Run `one(0..n-1)` on `concurrency` workers; fail the test if it takes over `deadline` s."""
    indices = iter(range(n))

    async def worker() -> None:
        for i in indices:  # shared: each index is taken by exactly one worker
            await one(i)

    with anyio.fail_after(deadline):
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)


def p99(values: Iterable[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def header(scope: dict[str, Any], name: bytes) -> str:
    return next(v for k, v in scope["headers"] if k == name).decode()


class CountingTracker(HealthTracker):
    """A HealthTracker that also counts every failure it is told about, per model."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failures_seen: collections.Counter[str] = collections.Counter()

    def record_failure(self, provider: str, model: str, *args: Any, **kwargs: Any) -> float | None:
        self.failures_seen[model] += 1
        return super().record_failure(provider, model, *args, **kwargs)


# -- 1. flaky providers -------------------------------------------------------------------------


class FlakyProvider:
    """A fake LLM provider failing at random: 503 with its own error body with probability
    `rate` (a seeded random.Random, so a run is reproducible)."""

    def __init__(self, rate: float, seed: int, health: HealthTracker | None = None) -> None:
        self.rate = rate
        self.rng = random.Random(seed)
        self.health = health
        self.calls = 0
        self.failures = 0
        self.by_model: collections.Counter[str] = collections.Counter()
        # Calls that reached a model on probation (half-open): in total, and at most at once.
        self.probes: collections.Counter[str] = collections.Counter()
        self.probing_now: collections.Counter[str] = collections.Counter()
        self.probing_max: collections.Counter[str] = collections.Counter()
        self.slots_max = 0  # the most probe slots the tracker ever reported taken for a model

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        message = await receive()
        assert message["type"] == "http.request"
        assert not message.get("more_body")
        model = header(scope, b"x-tier-model")
        probing = False
        if self.health is not None:
            status = self.health.status(PROVIDER_OF[model], model)
            probing = status.state == "probing"
            self.slots_max = max(self.slots_max, status.probes_in_flight)
        self.calls += 1
        self.by_model[model] += 1
        if probing:
            self.probes[model] += 1
            self.probing_now[model] += 1
            self.probing_max[model] = max(self.probing_max[model], self.probing_now[model])
        try:
            await anyio.lowlevel.checkpoint()  # other requests run while this one is "upstream"
            if self.rng.random() < self.rate:
                self.failures += 1
                status, body = 503, PROVIDER_ERROR
            else:
                status, body = 200, json.dumps({"model": model}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
        finally:
            if probing:
                self.probing_now[model] -= 1


async def test_random_provider_failures_are_retried_once_and_every_count_reconciles() -> None:
    n, rate = 5_000, 0.3
    provider = FlakyProvider(rate, seed=1234)
    registry = CollectorRegistry()
    mw = TierRoutingMiddleware(
        provider,
        config=CONFIG,
        routes=[ROUTE],
        # Far above any run of failures a 30 % rate produces: both models stay in rotation, so
        # every failed first attempt has another model to be retried on.
        health=HealthTracker(HealthConfig(failure_threshold=10**6), clock=FakeClock()),
        # A retry budget's job is to cap retries in a broad outage (tests/test_retry_budget.py).
        # With max_attempts=2 a request holds at most one retry, so retries in flight can never
        # exceed routed requests in flight: a ratio of 1.0 never binds, and this run measures
        # the retry rule itself rather than the budget.
        retries=RetryConfig(budget=1.0),
        registry=registry,
        rng=random.Random(99),
    )
    results: list[Result] = []

    async def one(i: int) -> None:
        results.append(await call(mw, chat("simple", user=i)))  # distinct, as real traffic is

    await load(n, 64, one, deadline=60)

    assert len(results) == n  # every request answered
    ok = [r for r in results if r.status == 200]
    failed = [r for r in results if r.status != 200]
    for r in ok:
        assert r.json() == {"model": r.headers["x-tier-model"]}
    for r in failed:
        # The provider's own failure after both attempts; never a middleware error.
        assert (r.status, r.body, r.headers["x-tier-attempts"]) == (503, PROVIDER_ERROR, "2")

    # One retry on an independent model: P(success) = 1 - rate**2. Four binomial sigmas either
    # way (a second retry would push the share to 1 - rate**3 = 0.973, far above the band).
    p = 1 - rate**2
    sigma = math.sqrt(n * p * (1 - p))
    assert n * p - 4 * sigma <= len(ok) <= n * p + 4 * sigma, (len(ok), n * p, sigma)

    attempts = [int(r.headers["x-tier-attempts"]) for r in results]
    retried = sum(a == 2 for a in attempts)
    selections = total(registry, "llm_model_selections_total")
    retries = total(registry, "llm_model_retries_total")
    assert selections == provider.calls == n + retries == sum(attempts)
    assert retries == retried
    assert total(registry, "llm_tier_requests_total", tier="simple") == n
    # A failure the request got past on the other model counts at once; one it never got past
    # (both attempts failed) only when failures of three distinct requests agree.
    confirmed = sum(r.status == 200 and r.headers["x-tier-attempts"] == "2" for r in results)
    unconfirmed = provider.failures - confirmed
    assert unconfirmed == 2 * len(failed)
    counted = total(registry, "llm_provider_failures_total")
    assert confirmed < counted < confirmed + unconfirmed
    assert total(registry, "llm_retries_over_budget_total") == 0
    assert total(registry, "llm_tier_unavailable_total") == 0
    # A retry always goes to the other model.
    for labels, _ in samples(registry, "llm_model_retries_total"):
        assert labels["failed_model"] != labels["retry_model"]
    assert (mw.budget.active, mw.budget.retrying) == (0, 0)


async def test_default_health_under_random_failures_never_hangs_and_recovers_by_probes() -> None:
    n, rate = 5_000, 0.3
    clock = FakeClock()
    health = HealthTracker(HealthConfig(), clock=clock)  # the defaults: 1 failure -> 30 s off
    provider = FlakyProvider(rate, seed=4321, health=health)
    registry = CollectorRegistry()
    mw = TierRoutingMiddleware(
        provider,
        config=WIDE_CONFIG,
        routes=[ROUTE],
        health=health,
        registry=registry,
        rng=random.Random(7),
    )
    models = [m["model"] for m in WIDE_CONFIG["tiers"]["simple"]]
    results: list[Result] = []

    async def one(i: int) -> None:
        results.append(await call(mw, chat("simple", user=i)))
        if i % 100 == 99:
            clock.advance(10.0)  # backoffs end mid-run: probes go out under concurrency

    await load(n, 64, one, deadline=60)

    assert len(results) == n
    served = app_failed = shed = 0
    for r in results:
        if r.status == 200:
            served += 1
            assert r.json() == {"model": r.headers["x-tier-model"]}
        elif r.status == 503 and r.body == PROVIDER_ERROR:
            app_failed += 1  # the provider's own failure, passed on as it came
            assert r.headers["x-tier-attempts"] in {"1", "2"}
        else:
            shed += 1  # the middleware's: every model of the tier is backed off
            assert r.status == 503, (r.status, r.body)
            assert r.json()["error"]["code"] == "service_unavailable"
            assert r.json()["error"]["type"] == "service_unavailable"
            assert 1 <= int(r.headers["retry-after"]) <= 60
            assert int(r.headers["retry-after-ms"]) > 0
            assert r.headers["x-tier-attempts"] == "0"
    # The run went through all three situations.
    assert served > 0
    assert app_failed > 0
    assert shed > 0
    assert total(registry, "llm_tier_unavailable_total", tier="simple") == shed
    # Every failure a retry got past counts; the others count only once they agree.
    confirmed = sum(r.status == 200 and r.headers["x-tier-attempts"] == "2" for r in results)
    assert confirmed <= total(registry, "llm_provider_failures_total") <= provider.failures
    assert total(registry, "llm_model_selections_total") == provider.calls
    assert total(registry, "llm_tier_requests_total", tier="simple") == n
    # Probes went out mid-run, never more at once than the one slot (half_open_probes=1), and
    # no slot is left taken once every request is done.
    assert sum(provider.probes.values()) > 0
    assert provider.slots_max == 1
    for model in models:
        assert health.status(PROVIDER_OF[model], model).probes_in_flight == 0
    assert (mw.budget.active, mw.budget.retrying) == (0, 0)

    # The providers heal. Past the longest backoff every failed model is half-open. A burst
    # arrives: each such model gets exactly one call (its probe) until that call reports back,
    # the rest of the burst waits for nothing (served by recovered models, or told to retry),
    # and the tier is whole again without a restart.
    provider.rate = 0.0
    clock.advance(HealthConfig().max_backoff + 1)
    half_open = {m for m in models if health.status(PROVIDER_OF[m], m).state == "probing"}
    assert half_open  # the run ended with models still marked as failing
    provider.probes.clear()
    provider.probing_max.clear()
    recovery: list[Result] = []

    async def recover(i: int) -> None:
        recovery.append(await call(mw, chat("simple", user=n + i)))

    await load(64, 64, recover, deadline=30)
    assert set(provider.probes) == half_open
    assert set(provider.probing_max.values()) == {1}  # one call at a time while half-open
    assert all(count == 1 for count in provider.probes.values())
    for r in recovery:
        assert r.status == 200 or r.json()["error"]["code"] == "service_unavailable"
    assert health.unavailable() == []
    assert all(health.status(PROVIDER_OF[m], m).state == "available" for m in models)
    for model in models:
        value = registry.get_sample_value(
            "llm_provider_health", {"provider": PROVIDER_OF[model], "model": model}
        )
        assert value == 1.0
    burst: list[Result] = []

    async def again(i: int) -> None:
        burst.append(await call(mw, chat("simple", user=2 * n + i)))

    await load(500, 64, again, deadline=30)
    assert [r.status for r in burst] == [200] * 500


# -- 2. Redis faults under load -----------------------------------------------------------------


class SteadyProvider:
    """Answers 200 after `latency` seconds of simulated upstream time; 503 for a request whose
    body says `"fail": true`."""

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.failed: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = json.loads((await receive())["body"])
        model = header(scope, b"x-tier-model")
        await anyio.sleep(self.latency)
        status = 503 if body.get("fail") else 200
        if status == 503:
            self.failed.append(model)
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps({"model": model}).encode()})


REDIS_TIMEOUT = 0.1  # RedisStore's socket timeout (the default)
TIERS = ("simple", "moderate", "complex")


async def run_sessions(
    mw: TierRoutingMiddleware,
    prefix: str,
    n: int,
    *,
    on_progress: Callable[[int], None] | None = None,
    models: dict[str, str] | None = None,
) -> list[float]:
    """`n` requests at concurrency 32 over 200 sessions that move up through the tiers (new
    sessions, plain reads and upgrades: reads and writes on the store). Returns each request's
    latency; asserts every one was a 200. `models` receives each session's last model."""
    latencies: list[float] = []
    done = 0

    async def one(i: int) -> None:
        nonlocal done
        tier = TIERS[min(i // 200, 2)]
        headers = [JSON, ("x-session-id", f"{prefix}-{i % 200}")]
        started = time.perf_counter()
        result = await call(mw, chat(tier), headers=headers)
        latencies.append(time.perf_counter() - started)
        assert result.status == 200, (result.status, result.body)
        if models is not None:
            models[headers[1][1]] = result.headers["x-tier-model"]
        done += 1
        if on_progress is not None:
            on_progress(done)

    await load(n, 32, one, deadline=30)
    return latencies


def session_keys(server: RedisServer, prefix: str) -> int:
    return sum(1 for key in server.command("KEYS", f"tier:s:anon:{prefix}-*"))


@pytest.mark.redis
@pytest.mark.parametrize("fault", ["kill", "pause", "freeze", "black_hole"])
async def test_redis_faults_under_load_fail_nothing_and_add_at_most_one_timeout(
    fresh_redis_server: RedisServer, fault: str
) -> None:
    server = fresh_redis_server
    partition = Partition(server.port)
    await partition.start()
    provider = SteadyProvider(latency=0.06)
    registry = CollectorRegistry()
    mw = TierRoutingMiddleware(
        provider,
        config=CONFIG,
        routes=[ROUTE],
        redis_url=partition.url if fault == "black_hole" else server.url,
        shared_health=True,
        registry=registry,
        rng=random.Random(5),
    )
    try:
        # The provider's 60 ms of upstream time (real time, it shapes the load) makes each
        # 800-request run last ~1.5 s: longer than the state backend's 1 s cooldown, so the
        # faulty run also retries the dead backend at least once before it is healed.
        await run_sessions(mw, "warm", 64)
        base: dict[str, str] = {}
        healthy = await run_sessions(mw, "base", 800, models=base)
        # Sessions went to Redis. (Not necessarily all: on a loaded 2-core machine a healthy
        # Redis can miss its 100 ms timeout now and then, and that is the fallback working.)
        assert session_keys(server, "base") > 100

        def inject(done: int) -> None:
            if done != 64:  # under load: 32 requests are in flight when it happens
                return
            if fault == "kill":
                server.kill()
            elif fault == "pause":
                server.pause(3_000)  # longer than the faulty run
            elif fault == "freeze":
                server.freeze()
            else:
                partition.cut = True

        faulty = await run_sessions(mw, "fault", 800, on_progress=inject)
        errors = total(registry, "llm_backend_errors_total")
        assert errors >= 1  # the fault was met, and survived
        added = p99(faulty) - p99(healthy)
        # One Redis call at most per request pays for the fault (then the in-process fallback
        # takes over for the cooldown). RedisStore bounds a call by its 100 ms timeout for the
        # reply, plus up to as much again waiting for a pooled connection while the fault
        # holds them all, so one call adds less than 2 x 100 ms; paying for a second call
        # would take a request past that.
        assert added < 2 * REDIS_TIMEOUT, (fault, p99(healthy), p99(faulty), max(faulty))

        if fault == "kill":
            server.start()
        elif fault == "freeze":
            server.thaw()
        elif fault == "black_hole":
            partition.heal()
        # pause: Redis answers again by itself when the pause ends.

        # The backend is tried again after its cooldown: new sessions land in Redis again.
        # (Real time: the cooldown and the pause are wall-clock by nature.)
        with anyio.fail_after(10):
            k = 0
            while session_keys(server, "after") == 0:
                assert (
                    await call(mw, chat(), headers=[JSON, ("x-session-id", f"after-{k}")])
                ).status == 200
                k += 1
                await anyio.sleep(0.05)
        for j in range(20):
            headers = [JSON, ("x-session-id", f"resumed-{j}")]
            assert (await call(mw, chat(), headers=headers)).status == 200
        assert session_keys(server, "resumed") == 20  # every one of them, not just the first
        # The sessions served before the fault kept their model through it, even where Redis
        # lost them (killed, nothing persisted): the local copy has them, and writes them back.
        sessions = sorted(base)

        async def resume(i: int) -> None:
            headers = [JSON, ("x-session-id", sessions[i])]
            result = await call(mw, chat("simple"), headers=headers)
            assert (result.status, result.headers["x-tier-model"]) == (200, base[sessions[i]])

        await load(len(sessions), 32, resume, deadline=30)
        assert session_keys(server, "base") == 200

        # Shared health is written to Redis again: failures counted now are in the hash (three
        # distinct requests that failed on both models agree).
        assert server.command("HLEN", "tier:health") == 0
        for k in range(3):
            result = await call(mw, chat("complex", fail=True, k=k), headers=[JSON])
            assert (result.status, result.headers["x-tier-attempts"]) == (503, "2")
        fields = server.command("HGETALL", "tier:health")
        assert {f.decode().split("\n")[1] for f in fields} == set(provider.failed) == {"o3", "opus"}
        assert all(v.decode().startswith("1:") for v in fields.values())
    finally:
        await mw.aclose()
        await partition.close()


class FailsOn:
    """200 for every model but `failing`, which answers 503."""

    def __init__(self, failing: str) -> None:
        self.failing = failing

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        status = 503 if header(scope, b"x-tier-model") == self.failing else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


@pytest.mark.redis
async def test_a_failure_recorded_during_a_redis_outage_outlives_the_recovery(
    fresh_redis_server: RedisServer,
) -> None:
    clock = FakeClock()  # health time stands still: the 30 s backoff cannot end by itself
    registry = CollectorRegistry()
    mw = TierRoutingMiddleware(
        FailsOn("4o"),
        config=CONFIG,
        routes=[ROUTE],
        redis_url=fresh_redis_server.url,
        shared_health=True,
        health_sync_interval=0.0,  # sync on every request
        health=HealthTracker(HealthConfig(), clock=clock),
        registry=registry,
        rng=random.Random(1),
    )
    mw.state.cooldown = 0.0  # try Redis again on the very next request

    def errors() -> float:
        return total(registry, "llm_backend_errors_total")

    try:
        assert (await call(mw, chat("simple"), headers=[JSON, ("x-session-id", "a")])).status == 200
        assert errors() == 0
        fresh_redis_server.kill()
        with anyio.fail_after(5):
            while mw.health.is_available("openai", "4o"):  # until the draw lands on 4o
                assert (await call(mw, chat("moderate"))).status == 200  # retried on sonnet
        assert errors() > 0  # recorded in process only
        fresh_redis_server.start()
        with anyio.fail_after(5):  # until a request loads (and so syncs) and saves on Redis
            k = 0
            while True:
                before = errors()
                headers = [JSON, ("x-session-id", f"back-{k}")]
                assert (await call(mw, chat("simple"), headers=headers)).status == 200
                k += 1
                if errors() == before:
                    break
        assert not mw.health.is_available("openai", "4o")  # it failed 0 s ago
    finally:
        await mw.aclose()


@pytest.mark.redis
async def test_a_session_upgraded_during_a_redis_partition_stays_upgraded(
    fresh_redis_server: RedisServer,
) -> None:
    partition = Partition(fresh_redis_server.port)
    await partition.start()
    mw = TierRoutingMiddleware(
        SteadyProvider(latency=0.0),
        config=CONFIG,
        routes=[ROUTE],
        redis_url=partition.url,
        registry=CollectorRegistry(),
        rng=random.Random(1),
    )
    mw.state.cooldown = 0.0
    headers = [JSON, ("x-session-id", "conv")]
    try:
        assert (await call(mw, chat("simple"), headers=headers)).headers["x-tier"] == "simple"
        partition.cut = True  # black hole: Redis keeps its (now stale) record
        upgraded = await call(mw, chat("complex"), headers=headers)
        assert upgraded.headers["x-tier"] == "complex"
        partition.heal()
        after = await call(mw, chat("simple"), headers=headers)
        assert (after.headers["x-tier"], after.headers["x-tier-model"]) == (
            "complex",
            upgraded.headers["x-tier-model"],
        )
    finally:
        await mw.aclose()
        await partition.close()


# -- 3. the control plane -----------------------------------------------------------------------


class Echo:
    """The app behind the middleware: answers 200 naming the model it was asked for."""

    def __init__(self) -> None:
        self.calls = 0
        self.refreshing: list[bool] = []
        self.mw: TierRoutingMiddleware | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        self.calls += 1
        if self.mw is not None:
            self.refreshing.append(self.mw.configs.refreshing)
        model = header(scope, b"x-tier-model")
        await anyio.lowlevel.checkpoint()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps({"model": model}).encode()})


FALLBACK = one_tier(entry("local", "fallback-mini"), version="fallback")
V1_SIMPLE = {"gpt-4o-mini", "gemini-flash"}  # control_plane.tier_payload()'s simple tier
TTL = 600.0
REFRESH_AT = 0.8 * TTL  # ConfigManager's default refresh_ahead
RETRY_INTERVAL = 30.0  # its default: min(ttl, 30)


@dataclass
class Plane:
    """A middleware on a control-plane source, its config clock in the test's hand."""

    plane: ControlPlane
    mw: TierRoutingMiddleware
    app: Echo
    clock: FakeClock
    registry: CollectorRegistry
    latencies: list[float] = field(default_factory=list)

    async def burst(self, n: int = 200, concurrency: int = 200) -> list[Result]:
        """`n` simple-tier requests at once; records each latency."""
        results: list[Result] = []

        async def one(i: int) -> None:
            started = time.perf_counter()
            results.append(await call(self.mw, chat("simple")))
            self.latencies.append(time.perf_counter() - started)

        self.latencies.clear()
        # A full collection of the whole suite's heap takes ~0.2 s on the 2-core machine, and
        # would land in one latency now and then: not what these bounds are about.
        gc.collect()
        gc.freeze()
        try:
            await load(n, concurrency, one, deadline=20)
        finally:
            gc.unfreeze()
        return results

    def refreshes(self, result: str) -> float:
        return total(self.registry, "llm_config_refreshes_total", result=result)


def plane_mw(plane: ControlPlane, timeout: float = 1.0, **options: Any) -> Plane:
    app = Echo()
    registry = CollectorRegistry()
    mw = TierRoutingMiddleware(
        app,
        config=ControlPlaneSource(plane.url, timeout=timeout, ttl=TTL),
        routes=[ROUTE],
        registry=registry,
        rng=random.Random(3),
        **options,
    )
    app.mw = mw
    clock = FakeClock()
    # Refresh due-ness runs on the manager's clock; nothing has read it yet, so every deadline
    # from here on is on the fake one.
    mw.configs.clock = clock
    return Plane(plane, mw, app, clock, registry)


def models(results: Iterable[Result]) -> set[str]:
    return {r.headers["x-tier-model"] for r in results}


async def test_control_plane_down_at_start_serves_the_fallback_then_the_real_config() -> None:
    plane = ControlPlane()
    await plane.start()
    await plane.stop()  # its port now refuses connections
    p = plane_mw(plane, fallback=FALLBACK, config_timeout=2.0)
    try:
        results = await p.burst()
        assert {r.status for r in results} == {200}
        assert models(results) == {"fallback-mini"}
        assert p.mw.configs.origin == "fallback"
        assert max(p.latencies) < 2.0  # a refused connection fails fast: no wait for the timeout
        # 200 requests arrived with no config at all: one fetch was tried for all of them.
        assert p.refreshes("error") == 1
        assert p.mw.configs.consecutive_failures == 1

        await plane.start()  # back on the same port
        p.clock.advance(RETRY_INTERVAL - 0.01)
        await p.burst()
        assert plane.hits == 0  # not due yet: a failed fetch is not retried per request
        p.clock.advance(0.01)
        await p.burst()  # the first of these starts the refresh; none waits for it
        await p.mw.configs.wait_idle()
        assert plane.hits == 1
        assert p.mw.configs.origin == "control_plane"
        assert p.mw.config is not None
        assert p.mw.config.version == "1"
        assert models(await p.burst()) == V1_SIMPLE
    finally:
        await p.mw.aclose()
        await plane.stop()


@pytest.mark.parametrize("fault", ["down", "html", "truncated_json", "zero_cost", "empty_tiers"])
async def test_a_failed_refresh_under_load_keeps_the_last_known_good_config(fault: str) -> None:
    async with ControlPlane() as plane:
        p = plane_mw(plane)
        try:
            assert models(await p.burst()) == V1_SIMPLE
            assert plane.hits == 1
            # The next answer would be version 2 with another simple model, if it were usable.
            plane.serve("2", simple_model="gpt-next")
            if fault == "down":
                await plane.stop()
            else:
                plane.behaviour = fault
            p.clock.advance(REFRESH_AT)
            during = await p.burst()
            await p.mw.configs.wait_idle()
            after = await p.burst()
            for results in (during, after):
                assert {r.status for r in results} == {200}
                assert models(results) == V1_SIMPLE
            assert p.mw.config is not None
            assert p.mw.config.version == "1"
            assert p.registry.get_sample_value("llm_config_info", {"version": "1"}) == 1
            assert p.refreshes("error") == 1  # 400 requests, one failed refresh
            assert plane.hits == (1 if fault == "down" else 2)

            # The control plane answers properly again: adopted at the next retry, no restart.
            if fault == "down":
                await plane.start()
            plane.behaviour = "ok"
            p.clock.advance(RETRY_INTERVAL)
            await p.burst()
            await p.mw.configs.wait_idle()
            assert p.mw.config.version == "2"
            assert p.registry.get_sample_value("llm_config_info", {"version": "1"}) is None
            assert "gpt-next" in models(await p.burst())
        finally:
            await p.mw.aclose()


@pytest.mark.parametrize("fallback", [True, False])
async def test_a_slow_control_plane_at_start_holds_requests_no_longer_than_config_timeout(
    fallback: bool,
) -> None:
    async with ControlPlane() as plane:
        plane.behaviour = "slow"
        plane.delay = 5.0
        config_timeout = 0.3
        # The fetch itself may take 2 s: requests must give up on it after 0.3 s regardless.
        p = plane_mw(
            plane,
            timeout=2.0,
            fallback=FALLBACK if fallback else None,
            config_timeout=config_timeout,
        )
        try:
            results = await p.burst()
            assert config_timeout * 0.9 <= min(p.latencies)  # they did wait for the fetch...
            assert max(p.latencies) <= config_timeout + 0.2  # ...but no longer than allowed
            if fallback:
                assert {r.status for r in results} == {200}
                assert models(results) == {"fallback-mini"}
            else:
                assert {r.status for r in results} == {503}
                assert {r.json()["error"]["code"] for r in results} == {"config_unavailable"}
                assert all(1 <= int(r.headers["retry-after"]) <= 60 for r in results)
            assert plane.hits == 1
            assert p.app.calls == (200 if fallback else 0)
        finally:
            await p.mw.aclose()


async def test_a_slow_refresh_never_holds_a_request() -> None:
    async with ControlPlane() as plane:
        p = plane_mw(plane, timeout=0.5)
        try:
            await p.burst()
            plane.serve("2", simple_model="gpt-next")
            plane.behaviour = "slow"
            plane.delay = 5.0
            p.clock.advance(REFRESH_AT)
            results = await p.burst()
            assert p.mw.configs.refreshing  # the fetch is still out...
            assert max(p.latencies) < 0.5  # ...and no request waited for it
            assert models(results) == V1_SIMPLE
            await p.mw.configs.wait_idle()  # the fetch times out after 0.5 s
            assert p.mw.config is not None
            assert p.mw.config.version == "1"
            assert p.refreshes("error") == 1
            assert plane.hits == 2
        finally:
            await p.mw.aclose()


async def test_one_fetch_per_refresh_window_under_200_concurrent_requests() -> None:
    async with ControlPlane() as plane:
        plane.behaviour = "slow"
        plane.delay = 0.2  # every fetch is still in flight while the burst arrives
        p = plane_mw(plane)
        try:
            # No config yet: 200 requests wait for one fetch.
            assert {r.status for r in await p.burst()} == {200}
            assert plane.hits == 1
            for window in range(2, 5):
                plane.serve(str(window))
                plane.behaviour = "slow"
                p.clock.advance(REFRESH_AT - 0.01)
                await p.burst()
                assert plane.hits == window - 1  # not due yet
                p.clock.advance(0.01)  # due now, for all 200 at once
                p.app.refreshing.clear()
                await p.burst()
                assert sum(p.app.refreshing) > 100  # most of them ran while it was in flight
                await p.mw.configs.wait_idle()
                assert plane.hits == window
                assert p.mw.config is not None
                assert p.mw.config.version == str(window)
            assert p.refreshes("success") == 4
        finally:
            await p.mw.aclose()


# -- 4. apps that raise, clients that leave -----------------------------------------------------


class Boom(Exception):
    """The app's own error (a provider SDK blowing up, say)."""


class AppSawDisconnect(Exception):
    """What a framework raises when its receive() returns http.disconnect (cf. Starlette's
    ClientDisconnect)."""


@dataclass
class LeavingClient(Client):
    """A client that hangs up after receiving `leave_after` response body chunks."""

    leave_after: int | None = None

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        chunks = sum(m["type"] == "http.response.body" for m in self.sent)
        if self.leave_after is not None and chunks >= self.leave_after:
            self.disconnect.set()


SCENARIOS = (
    "ok",
    "raise_first",  # Boom on the first attempt only: retried, served by the other model
    "raise_always",  # Boom on every attempt: Boom reaches the caller after the retry
    "raise_mid_stream",  # Boom after a 200 start and one chunk: no retry possible
    "leave_body",  # the client hangs up while sending the body
    "leave_stream",  # the client hangs up after the first chunk; the app stops streaming
    "leave_stream_raise",  # ... and the app raises its own error on the disconnect
)


class Scripted:
    """An app doing what each request's body says (see SCENARIOS)."""

    def __init__(self) -> None:
        self.calls = 0
        self.attempts: collections.Counter[int] = collections.Counter()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = json.loads((await receive())["body"])
        self.calls += 1
        rid, scenario = body["rid"], body["scenario"]
        self.attempts[rid] += 1
        await anyio.lowlevel.checkpoint()
        if scenario == "raise_always" or (scenario == "raise_first" and self.attempts[rid] == 1):
            raise Boom(f"request {rid}")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        more = scenario != "ok"
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": more})
        if scenario == "raise_mid_stream":
            await anyio.lowlevel.checkpoint()
            raise Boom(f"request {rid}: upstream stream broke")
        if scenario.startswith("leave_stream"):
            message = await receive()  # like a streaming response watching for the client
            assert message["type"] == "http.disconnect"
            if scenario == "leave_stream_raise":
                raise AppSawDisconnect
        elif more:
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


async def test_mixed_app_errors_and_disconnects_under_load_count_only_real_failures() -> None:
    n = 3_000
    rng = random.Random(2024)
    plan = [rng.choice(SCENARIOS) for _ in range(n)]
    count = collections.Counter(plan)
    app = Scripted()
    registry = CollectorRegistry()
    # Every real failure counts at once here (none waits for agreement), so the counts below
    # reconcile exactly: what this run checks is that disconnects never count.
    cfg = HealthConfig(failure_threshold=10**6, unconfirmed_threshold=1)
    health = CountingTracker(cfg, clock=FakeClock())
    mw = TierRoutingMiddleware(
        app,
        config=CONFIG,
        routes=[ROUTE],
        health=health,
        retries=RetryConfig(budget=1.0),
        registry=registry,
    )
    raised: dict[int, BaseException] = {}
    clients: dict[int, LeavingClient] = {}

    async def one(i: int) -> None:
        scenario = plan[i]
        body = chat("moderate", rid=i, scenario=scenario)
        if scenario == "leave_body":
            client = LeavingClient(chunks=[body[:20], body[20:]], disconnect_during_body=True)
        else:
            leave = 1 if scenario.startswith("leave_stream") else None
            client = LeavingClient(chunks=[body], leave_after=leave)
        clients[i] = client
        try:
            await call(mw, client=client)
        except Exception as exc:
            raised[i] = exc

    await load(n, 64, one, deadline=60)

    # Only the app's own exceptions escape, and only where the app ended with one.
    expected = {
        "raise_always": Boom,
        "raise_mid_stream": Boom,
        "leave_stream_raise": AppSawDisconnect,
    }
    assert {i: type(e) for i, e in raised.items()} == {
        i: expected[s] for i, s in enumerate(plan) if s in expected
    }
    for i, scenario in enumerate(plan):
        sent = clients[i].sent
        starts = [m for m in sent if m["type"] == "http.response.start"]
        if scenario in ("leave_body", "raise_always"):
            assert sent == []  # nobody to answer / nothing started: the server answers 500
        else:
            assert [m["status"] for m in starts] == [200]
            attempts = dict(starts[0]["headers"])[b"x-tier-attempts"]
            assert attempts == (b"2" if scenario == "raise_first" else b"1")

    real_failures = count["raise_first"] + 2 * count["raise_always"] + count["raise_mid_stream"]
    assert total(registry, "llm_provider_failures_total") == real_failures
    assert sum(health.failures_seen.values()) == real_failures
    assert (
        total(registry, "llm_model_retries_total") == count["raise_first"] + count["raise_always"]
    )
    assert total(registry, "llm_model_selections_total") == app.calls
    assert app.calls == n - count["leave_body"] + count["raise_first"] + count["raise_always"]
    # A client that left before its body was complete never became a routed request.
    assert total(registry, "llm_tier_requests_total") == n - count["leave_body"]
    assert (mw.budget.active, mw.budget.retrying) == (0, 0)
    for model in ("4o", "sonnet"):
        assert health.status(PROVIDER_OF[model], model).probes_in_flight == 0


def one_model_mw(app: Any, **options: Any) -> tuple[TierRoutingMiddleware, CollectorRegistry]:
    registry = CollectorRegistry()
    config = one_tier(entry("openai", "mini"))
    # One model: no request ever gets past a failure, so one failure counts at once here.
    health = HealthTracker(HealthConfig(unconfirmed_threshold=1), clock=FakeClock())
    mw = TierRoutingMiddleware(
        app, config=config, routes=[ROUTE], health=health, registry=registry, **options
    )
    return mw, registry


async def test_with_default_health_a_disconnect_is_no_failure_and_an_exception_is() -> None:
    app = Scripted()
    mw, registry = one_model_mw(app)

    def failures() -> float:
        return total(registry, "llm_provider_failures_total")

    async def request(scenario: str, rid: int) -> LeavingClient:
        body = chat(rid=rid, scenario=scenario)
        if scenario == "leave_body":
            client = LeavingClient(chunks=[body[:20], body[20:]], disconnect_during_body=True)
        else:
            client = LeavingClient(chunks=[body], leave_after=1)
        await call(mw, client=client)
        return client

    # The client leaves mid-body, then twice mid-stream (once the app just stops, once it
    # raises its own error on seeing the disconnect): the one model stays in rotation.
    await request("leave_body", 1)
    await request("leave_stream", 2)
    with pytest.raises(AppSawDisconnect):
        await request("leave_stream_raise", 3)
    assert mw.health.is_available("openai", "mini")
    assert failures() == 0
    assert (await call(mw, chat(rid=4, scenario="ok"))).status == 200

    # An upload the middleware does not hold (chunked, not JSON) streams to the app live;
    # the client leaves half-way and the app raises on it. Still not the provider's fault.
    async def upload(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive())["type"] == "http.request":
            pass
        raise AppSawDisconnect

    upload_mw, upload_registry = one_model_mw(upload)
    client = Client(chunks=[b"part one", b"part two", b"end"], disconnect_during_body=True)
    scope = http_scope(
        ROUTE, [("content-type", "application/octet-stream"), ("transfer-encoding", "chunked")]
    )
    scope["headers"].append((b"x-tier", b"simple"))
    with pytest.raises(AppSawDisconnect):
        await call(upload_mw, client=client, scope=scope)
    assert upload_mw.health.is_available("openai", "mini")
    assert total(upload_registry, "llm_provider_failures_total") == 0
    assert total(upload_registry, "llm_model_selections_total") == 1

    # An exception after the response started is the provider failing: backed off, counted.
    with pytest.raises(Boom):
        await request("raise_mid_stream", 5)
    assert not mw.health.is_available("openai", "mini")
    assert failures() == 1
    shed = await call(mw, chat(rid=6, scenario="ok"))
    assert (shed.status, shed.json()["error"]["code"]) == (503, "service_unavailable")


class ServerGone(OSError):
    """What an ASGI 2.4 server's send() raises once the client is gone (uvicorn's
    ClientDisconnected is such an OSError)."""


@pytest.mark.parametrize("app_reraises_as", [None, AppSawDisconnect])
async def test_a_disconnect_reported_by_send_is_no_provider_failure(
    app_reraises_as: type[Exception] | None,
) -> None:
    async def stream(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            for n in range(3):
                await send({"type": "http.response.body", "body": b"%d" % n, "more_body": True})
        except OSError:
            if app_reraises_as is None:
                raise
            raise app_reraises_as from None  # Starlette >= 0.38: ClientDisconnect
        await send({"type": "http.response.body", "body": b""})

    class SpecClient(Client):
        async def send(self, message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":  # the client left after the start
                raise ServerGone("client disconnected")
            self.sent.append(message)

    mw, registry = one_model_mw(stream)
    scope = http_scope()
    scope["asgi"]["spec_version"] = "2.4"
    with pytest.raises(app_reraises_as or ServerGone):
        await call(mw, chat(), client=SpecClient(chunks=[chat()]), scope=scope)
    assert total(registry, "llm_provider_failures_total") == 0
    assert mw.health.is_available("openai", "mini")
