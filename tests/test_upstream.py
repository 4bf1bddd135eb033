"""UpstreamTransport: the provider call reports its own outcome and goes to the chosen provider.

Real SDKs (`openai` 3.x and `anthropic` on httpx2, and a hand-written httpx call) against a fake
provider, reached through `httpx2.MockTransport` as the transport's inner transport, or over
loopback HTTP (uvicorn). The service is a real FastAPI app behind the middleware; the endpoint's
behaviour is named in the request body (`behave`), which the rewrite passes on untouched.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anthropic
import anyio
import httpx
import httpx2
import openai
import pytest
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry
from starlette.responses import JSONResponse, Response, StreamingResponse

from _clock import FakeClock
from configs import real_names
from llm_provider import CHAT, FakeProvider, fails
from samples import scrape, total, value
from servers import serve
from tier_middleware import (
    ConfigError,
    HealthConfig,
    HealthTracker,
    TierConfig,
    TierRoutingMiddleware,
    UpstreamTransport,
)

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "hi"}]


def tiers(providers: dict[str, Any] | None = None) -> dict[str, Any]:
    return real_names(providers=providers)


def service(
    sdk_transport: Any,
    *,
    config: dict[str, Any],
    sdk: str = "openai",
    base_url: str = "http://placeholder/v1",
    max_retries: int = 0,
    **middleware: Any,
) -> FastAPI:
    """A FastAPI service whose chat endpoint calls the provider with the real SDK over
    `sdk_transport` (an UpstreamTransport), doing what the body's `behave` says."""
    http_client = httpx2.AsyncClient(transport=sdk_transport)
    client = openai.AsyncOpenAI(
        api_key="sk-placeholder",
        base_url=base_url,
        max_retries=max_retries,
        http_client=http_client,
    )
    claude = anthropic.AsyncAnthropic(
        api_key="sk-ant-placeholder",
        base_url=base_url.removesuffix("/v1"),
        max_retries=max_retries,
        http_client=http_client,
    )
    app = FastAPI()

    @app.post(CHAT)
    async def chat(request: Request) -> Response:
        body = await request.json()
        behave = body.get("behave", "plain")
        model = "gpt-4o" if behave == "hardcoded" else body["model"]
        try:
            if behave == "stream":
                stream = await client.chat.completions.create(
                    model=model, messages=body["messages"], stream=True
                )

                async def relay() -> AsyncIterator[bytes]:
                    async for chunk in stream:
                        yield f"data: {chunk.model_dump_json()}\n\n".encode()

                return StreamingResponse(relay(), media_type="text/event-stream")
            for _ in range(100 if behave == "many" else 1):
                if sdk == "anthropic":
                    reply: Any = await claude.messages.create(
                        model=model, max_tokens=16, messages=body["messages"]
                    )
                else:
                    reply = await client.chat.completions.create(
                        model=model, messages=body["messages"]
                    )
        except (openai.APIStatusError, anthropic.APIStatusError) as exc:
            if behave == "hide":  # the careless catch: an error body behind a 200
                return JSONResponse({"answer": None, "error": str(exc)})
            if behave == "map500":
                return JSONResponse({"error": "upstream said no"}, status_code=500)
            raise
        if behave == "bug":
            raise RuntimeError("the app's own bug, after the provider answered")
        return JSONResponse(reply.model_dump())

    middleware.setdefault("registry", CollectorRegistry())
    app.add_middleware(TierRoutingMiddleware, config=config, routes=[CHAT], **middleware)
    return app


class Stack:
    def __init__(self, client: httpx.AsyncClient, health: HealthTracker, registry: Any) -> None:
        self.client = client
        self.health = health
        self.registry = registry

    async def chat(self, tier: str = "simple", **fields: Any) -> httpx.Response:
        body = {"tier": tier, "messages": MESSAGES, **fields}
        return await self.client.post(CHAT, json=body)

    def backed_off(self) -> set[str]:
        return {model for _, model, _ in self.health.unavailable()}


@asynccontextmanager
async def stack(
    provider: FakeProvider, *, config: dict[str, Any] | None = None, seed: int = 1, **options: Any
) -> AsyncIterator[Stack]:
    health = HealthTracker(HealthConfig(), clock=FakeClock())
    registry = CollectorRegistry()
    transport = UpstreamTransport(httpx2.MockTransport(provider.handler))
    app = service(
        transport,
        config=config or tiers(),
        health=health,
        registry=registry,
        rng=random.Random(seed),
        **options,
    )
    asgi = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=asgi, base_url="http://service") as client:
        yield Stack(client, health, registry)
    await transport.aclose()


# -- the provider's outcome decides ---------------------------------------------------------------


async def test_an_app_bug_after_a_provider_200_is_the_apps_not_the_models() -> None:
    provider = FakeProvider()
    async with stack(provider) as s:
        for n in range(6):
            response = await s.chat(behave="bug", user=f"u{n}")
            assert response.status_code == 500  # the app's own error, as it came
        samples = scrape(s.registry)
    assert len(provider.hits) == 6  # no retry on another model
    assert s.backed_off() == set()
    assert total(samples, "llm_provider_failures_total") == 0
    assert total(samples, "llm_model_retries_total") == 0
    models = [("openai", "gpt-4o-mini"), ("google", "gemini-2.0-flash")]
    assert all(s.health.status(p, m).unconfirmed_failures == 0 for p, m in models)


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
async def test_a_429_the_app_hides_behind_a_200_is_a_failure_and_is_retried(sdk: str) -> None:
    provider = FakeProvider()
    provider.rules.append(fails("gpt-4o-mini", 429))
    provider.failure_headers = {"retry-after": "120"}  # the app copies none of it
    async with stack(provider, sdk=sdk) as s:
        attempts = []
        for n in range(20):
            response = await s.chat(behave="hide", user=f"u{n}")
            assert response.status_code == 200
            assert response.headers["x-tier-model"] == "gemini-2.0-flash"
            attempts.append(response.headers["x-tier-attempts"])
    assert provider.hits.count("gpt-4o-mini") == 1
    assert attempts.count("2") == 1  # the one request that met mini was retried on flash
    assert s.backed_off() == {"gpt-4o-mini"}
    # The provider's own Retry-After reached the health tracker, though the app hid it.
    remaining = s.health.backoff_remaining("openai", "gpt-4o-mini")
    assert remaining == pytest.approx(120.0)


async def test_a_provider_4xx_the_app_maps_to_500_is_the_callers() -> None:
    provider = FakeProvider()
    provider.rules.append(lambda model, prompt: 400)
    async with stack(provider) as s:
        for n in range(5):
            response = await s.chat(behave="map500", user=f"u{n}")
            assert response.status_code == 500  # the app's answer goes out unchanged
            assert response.json() == {"error": "upstream said no"}
            assert response.headers["x-tier-attempts"] == "1"
        samples = scrape(s.registry)
    assert len(provider.hits) == 5
    assert s.backed_off() == set()
    assert total(samples, "llm_caller_errors_total") == 5
    assert total(samples, "llm_provider_failures_total") == 0


async def test_a_hundred_calls_keep_one_verdict_and_a_failure_the_sdk_got_past_counts_once() -> (
    None
):
    """The endpoint makes a hundred provider calls in one request; the 50th fails and the SDK's
    retry of it succeeds. The request is served on its first model, the failure counts once,
    and the model, whose last answer was a success, stays in rotation."""
    provider = FakeProvider()
    calls = 0

    def fiftieth(model: str, prompt: str) -> int | None:
        nonlocal calls
        calls += 1
        return 503 if calls == 50 else None

    provider.rules.append(fiftieth)
    provider.failure_headers = {"retry-after-ms": "1"}
    async with stack(provider, max_retries=1) as s:
        response = await s.chat(tier="moderate", behave="many")
        samples = scrape(s.registry)
    assert (response.status_code, response.headers["x-tier-attempts"]) == (200, "1")
    assert len(provider.hits) == 101
    assert value(samples, "llm_provider_failures_total", provider="openai", model="gpt-4o") == 1
    assert s.health.is_available("openai", "gpt-4o")


async def test_the_sdk_default_retries_hit_a_failing_model_three_times_per_request() -> None:
    """What `max_retries=0` on the upstream client saves: each client request costs the failing
    model 1 + the SDK's retries before the middleware can fail over."""
    hits_per_request = {}
    for retries in (2, 0):  # the openai SDK's default, and the documented setting
        provider = FakeProvider()
        provider.rules.append(fails("gpt-4o-mini", 503))
        provider.failure_headers = {"retry-after-ms": "1"}  # keep the SDK's waits short
        async with stack(provider, max_retries=retries, seed=4) as s:
            while "gpt-4o-mini" not in provider.hits:
                response = await s.chat(user=f"u{len(provider.hits)}")
                assert response.status_code == 200
        hits_per_request[retries] = provider.hits.count("gpt-4o-mini")
    assert hits_per_request == {2: 3, 0: 1}


# -- dispatch to the chosen provider --------------------------------------------------------------


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {"OPENAI_KEY_T": "sk-openai-1f2e", "GEMINI_KEY_T": "gm-key-7a7a"}
    for name, key in values.items():
        monkeypatch.setenv(name, key)
    return values


async def test_each_call_goes_to_the_chosen_providers_base_url_with_its_key(
    keys: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two providers over loopback HTTP, one OpenAI SDK client: each call goes to the base URL
    of the provider chosen for it, with that provider's key in that provider's header."""
    openai_side, gemini_side = FakeProvider(), FakeProvider()
    async with serve(openai_side.asgi) as openai_url, serve(gemini_side.asgi) as gemini_url:
        providers = {
            "openai": {"base_url": f"{openai_url}/v1", "api_key_env": "OPENAI_KEY_T"},
            "google": {
                "baseUrl": f"{gemini_url}/v1beta/openai",
                "apiKeyEnv": "GEMINI_KEY_T",
                "authHeader": "x-goog-api-key",
            },
        }
        transport = UpstreamTransport()  # the plain httpx2 transport, over the network
        app = service(transport, config=tiers(providers), rng=random.Random(2))
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://service"
        ) as client:
            served = []
            for n in range(12):
                body = {"tier": "simple", "messages": MESSAGES, "behave": "hardcoded", "n": n}
                response = await client.post(CHAT, json=body)
                assert response.status_code == 200
                served.append(response.headers["x-tier-model"])
                assert response.json()["model"] == served[-1]  # not the hard-coded gpt-4o
            # A rotated key is read at the next call.
            monkeypatch.setenv("OPENAI_KEY_T", "sk-openai-rotated")
            while True:
                response = await client.post(CHAT, json={"tier": "moderate", "messages": MESSAGES})
                if response.headers["x-tier-provider"] == "openai":
                    break
        await transport.aclose()
    assert set(served) == {"gpt-4o-mini", "gemini-2.0-flash"}
    for call in openai_side.calls:
        assert call.url.startswith(f"{openai_url}/v1/chat/completions")
        assert call.headers["authorization"] in (
            "Bearer sk-openai-1f2e",
            "Bearer sk-openai-rotated",
        )
        assert call.model in ("gpt-4o-mini", "gpt-4o")
    assert openai_side.calls[-1].headers["authorization"] == "Bearer sk-openai-rotated"
    for call in gemini_side.calls:
        assert call.url == f"{gemini_url}/v1beta/openai/chat/completions"
        assert call.headers["x-goog-api-key"] == "gm-key-7a7a"
        assert "authorization" not in call.headers  # the SDK's placeholder key never leaves
        assert call.model == "gemini-2.0-flash"
    assert len(openai_side.calls) + len(gemini_side.calls) == len(served) + 1


def test_a_missing_key_is_a_clear_error_at_config_load(tmp_path: Path) -> None:
    providers = {"google": {"base_url": "https://example.test/v1", "api_key_env": "NO_SUCH_KEY_T"}}
    with pytest.raises(ConfigError, match="NO_SUCH_KEY_T") as caught:
        TierConfig.load(tiers(providers))
    assert "provider 'google'" in str(caught.value)
    path = tmp_path / "tiers.json"
    path.write_text(json.dumps(tiers(providers)))
    env = {k: v for k, v in os.environ.items() if k != "NO_SUCH_KEY_T"}
    result = subprocess.run(
        [sys.executable, "-m", "tier_middleware", "check", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 1
    assert "environment variable NO_SUCH_KEY_T (api_key_env) is not set" in result.stderr


@pytest.mark.parametrize("behave", ["plain", "map500"])
async def test_a_key_gone_at_request_time_is_a_503_and_no_call(
    keys: dict[str, str], monkeypatch: pytest.MonkeyPatch, behave: str
) -> None:
    provider = FakeProvider()
    providers = {"openai": {"base_url": "https://openai.test/v1", "api_key_env": "OPENAI_KEY_T"}}
    async with stack(provider, config=tiers(providers)) as s:
        assert (await s.chat(tier="moderate", behave=behave)).status_code == 200
        monkeypatch.delenv("OPENAI_KEY_T")  # after the config was loaded: gone at call time
        response = await s.chat(tier="moderate", behave=behave)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "provider_misconfigured"
    assert "OPENAI_KEY_T" not in response.text
    assert "sk-" not in response.text
    assert response.headers["x-tier-provider"] == "openai"
    assert len(provider.calls) == 1  # the one before: never a call with no key
    assert s.backed_off() == set()  # the model was never asked


async def test_a_path_outside_base_path_is_a_clear_error_not_a_guess(
    keys: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    provider = FakeProvider()
    providers = {"openai": {"base_url": "https://openai.test/v1", "api_key_env": "OPENAI_KEY_T"}}
    transport = UpstreamTransport(httpx2.MockTransport(provider.handler), base_path="/v1")
    app = service(transport, config=tiers(providers), base_url="http://placeholder/api")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://s"
    ) as client:
        response = await client.post(CHAT, json={"tier": "moderate", "messages": MESSAGES})
    assert (response.status_code, response.json()["error"]["code"]) == (
        503,
        "provider_misconfigured",
    )
    assert provider.calls == []
    [record] = [r for r in caplog.records if r.getMessage() == "provider call not dispatched"]
    assert "outside base_path '/v1'" in record.reason  # type: ignore[attr-defined]
    assert "sk-openai" not in caplog.text


# -- streaming, and calls that are not ours -------------------------------------------------------


async def test_a_stream_passes_through_the_transport_unbuffered() -> None:
    """Provider -> transport -> SDK -> app -> middleware -> client, all over loopback: the
    provider sends its second chunk only once the client has the first."""
    provider = FakeProvider()
    provider.stream_gate = anyio.Event()  # type: ignore[assignment]
    async with serve(provider.asgi) as provider_url:
        transport = UpstreamTransport()
        app = service(transport, config=tiers(), base_url=f"{provider_url}/v1")
        async with serve(app) as service_url, httpx.AsyncClient(base_url=service_url) as client:
            body = {"tier": "simple", "messages": MESSAGES, "behave": "stream"}
            began = time.perf_counter()
            try:
                with anyio.fail_after(10):
                    async with client.stream("POST", CHAT, json=body) as response:
                        assert response.status_code == 200
                        chunks = response.aiter_text()
                        first = await chunks.__anext__()
                        first_chunk_after = time.perf_counter() - began
                        provider.stream_gate.set()
                        rest = "".join([c async for c in chunks])
            finally:
                provider.stream_gate.set()  # a buffering regression fails here, never hangs
        await transport.aclose()
    assert '"content":"Hel"' in first
    assert '"content":"lo"' not in first
    assert '"content":"lo"' in rest
    assert '"content":"!"' in rest
    assert first_chunk_after < 5.0  # it came while the provider was still holding the rest


class Broken(httpx2.AsyncByteStream):
    """A body that starts, then the connection drops."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'{"id": "chatcmpl-1", "obj'
        raise httpx2.ReadError("connection reset by peer")


BROKEN = {
    "stream breaks": lambda: httpx2.Response(
        200, headers={"content-type": "application/json"}, stream=Broken()
    ),
    "no HTTP": httpx2.RemoteProtocolError("illegal status line: b'SSH-2.0-OpenSSH'"),
    "refused": httpx2.ConnectError("connection refused"),
    "read timeout": httpx2.ReadTimeout("timed out"),
}


@pytest.mark.parametrize("broken", BROKEN.values(), ids=BROKEN.keys())
async def test_a_broken_answer_or_none_at_all_is_a_model_failure(broken: Any) -> None:
    """A provider that answers 200 and then drops the connection mid-body, speaks no HTTP,
    refuses the connection or never answers: the app's SDK raises, the transport has told the
    middleware it was the model, and another model serves."""
    provider = FakeProvider()

    async def handler(request: httpx2.Request) -> httpx2.Response:
        if json.loads(request.content)["model"] != "gpt-4o-mini":
            return await provider.handler(request)
        provider.hits.append("gpt-4o-mini")
        if isinstance(broken, Exception):
            raise broken
        response: httpx2.Response = broken()
        return response

    transport = UpstreamTransport(httpx2.MockTransport(handler))
    health = HealthTracker(HealthConfig(), clock=FakeClock())
    app = service(transport, config=tiers(), health=health, rng=random.Random(1))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://s"
    ) as client:
        for n in range(20):
            body = {"tier": "simple", "messages": MESSAGES, "behave": "hide", "n": n}
            response = await client.post(CHAT, json=body)
            assert response.status_code == 200
            assert response.headers["x-tier-model"] == "gemini-2.0-flash"
    assert provider.hits.count("gpt-4o-mini") == 1
    assert not health.is_available("openai", "gpt-4o-mini")


async def test_calls_outside_a_routed_request_are_untouched(keys: dict[str, str]) -> None:
    provider = FakeProvider()
    providers = {"openai": {"base_url": "https://openai.test/v1", "api_key_env": "OPENAI_KEY_T"}}
    TierConfig.load(tiers(providers))  # a dispatch table exists, but no request is routed
    transport = UpstreamTransport(httpx2.MockTransport(provider.handler))
    client = openai.AsyncOpenAI(
        api_key="sk-own",
        base_url="http://own.test/v1",
        http_client=httpx2.AsyncClient(transport=transport),
    )
    reply = await client.chat.completions.create(model="my-model", messages=MESSAGES)  # type: ignore[arg-type]
    await transport.aclose()
    assert reply.model == "my-model"
    [call] = provider.calls
    assert call.url == "http://own.test/v1/chat/completions"
    assert call.headers["authorization"] == "Bearer sk-own"


async def test_a_hand_written_httpx_call_reports_too() -> None:
    """Not an SDK: an httpx (not httpx2) client, a 503 the app turns into a 200."""
    failing = {"gpt-4o-mini"}
    hits: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        model = json.loads(request.content)["model"]
        hits.append(model)
        return httpx.Response(503 if model in failing else 200, json={"model": model})

    client = httpx.AsyncClient(transport=UpstreamTransport(httpx.MockTransport(handler)))
    app = FastAPI()

    @app.post(CHAT)
    async def chat(request: Request) -> Response:
        body = await request.json()
        reply = await client.post("http://provider.test/v1/chat/completions", json=body)
        return JSONResponse({"ok": reply.is_success})  # a 200 whatever the provider said

    health = HealthTracker(HealthConfig(), clock=FakeClock())
    app.add_middleware(
        TierRoutingMiddleware,
        config=tiers(),
        routes=[CHAT],
        health=health,
        registry=CollectorRegistry(),
        rng=random.Random(1),
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://s") as c:
        for n in range(20):
            response = await c.post(CHAT, json={"tier": "simple", "messages": MESSAGES, "n": n})
            assert response.json() == {"ok": True}
    await client.aclose()
    assert hits.count("gpt-4o-mini") == 1
    assert not health.is_available("openai", "gpt-4o-mini")


def test_the_package_imports_and_the_transport_exists_without_httpx2() -> None:
    code = (
        "import sys; sys.modules['httpx2'] = None\n"
        "import tier_middleware\n"
        "print(tier_middleware.UpstreamTransport.__name__)"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "UpstreamTransport"


def test_base_path_is_validated() -> None:
    with pytest.raises(ValueError, match="base_path"):
        UpstreamTransport(base_path="v1")
    assert UpstreamTransport(base_path="/v1/").base_path == "/v1"
