"""What the package logs: never a credential, nothing per successful request above DEBUG, and
health transitions with structured fields.

Every record of every logger is captured (caplog at DEBUG on the root and on "tier_middleware")
and searched for the secrets in its message, its args, every attribute a handler could serialise
(the `extra` fields included, via repr) and its formatted traceback.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from _clock import FakeClock
from asgi_harness import Provider, call
from configs import weighted
from control_plane import ControlPlane, http_response, tier_payload
from tier_middleware import (
    ControlPlaneSource,
    HealthConfig,
    HealthTracker,
    TierRoutingMiddleware,
)

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
SECRET_MARK = "sk-secret"  # every secret below starts with it
REQUEST_HEADERS = (
    ("content-type", "application/json"),
    ("authorization", "Bearer sk-secret-AAA"),
    ("api-key", "sk-secret-BBB"),
    ("x-api-key", "sk-secret-CCC"),
)
CONFIG = weighted("log-1", haiku_cost=1)


def chat(tier: str) -> bytes:
    return json.dumps({"tier": tier, "messages": [{"role": "user", "content": "hi"}]}).encode()


async def send(
    mw: TierRoutingMiddleware, tier: str, session: str | None = None, headers: Any = ()
) -> Any:
    extra = [("x-session-id", session)] if session else []
    return await call(mw, chat(tier), path=CHAT, headers=[*REQUEST_HEADERS, *extra, *headers])


def texts(record: logging.LogRecord) -> Iterator[tuple[str, str]]:
    """Everything of a record a handler or formatter could put somewhere."""
    yield "getMessage()", record.getMessage()
    yield "formatted", logging.Formatter("%(message)s").format(record)  # traceback, stack
    for key, value in list(vars(record).items()):
        yield key, repr(value)
    if record.exc_info and record.exc_info[1] is not None:
        exc: BaseException | None = record.exc_info[1]
        while exc is not None:  # the chain a structured handler might walk
            yield "exception", f"{exc!r} {exc.args!r} {vars(exc)!r}"
            exc = exc.__cause__ or exc.__context__


def leaks(records: list[logging.LogRecord]) -> list[str]:
    return [
        f"{r.name} {r.levelname} {r.msg!r} in {where}: {text[:300]}"
        for r in records
        for where, text in texts(r)
        if SECRET_MARK in text
    ]


@pytest.fixture
def capture(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="tier_middleware")
    return caplog


class EchoingControlPlane(ControlPlane):
    """A control plane that, in the `echo_*` behaviours, puts the credentials it received into
    its answer, as a misconfigured proxy or a chatty error page does."""

    async def _response(self, method: str, path: str) -> bytes:
        headers = self.requests[-1].headers if self.requests else {}
        auth = headers.get("authorization", "")
        client_secret = headers.get("x-client-secret", "")
        if self.behaviour == "echo_failure":
            error = f"credentials {auth!r} and {client_secret!r} were rejected"
            return http_response(200, json.dumps({"success": False, "error": error}).encode())
        if self.behaviour == "echo_invalid":
            data = tier_payload("echo")
            data["tiers"]["simple"][0].update({"model": auth, "relativeCost": 0})
            data["tiers"]["simple"][1].update({"provider": client_secret, "relativeCost": "x"})
            return http_response(200, json.dumps({"success": True, "data": data}).encode())
        if self.behaviour == "echo_html":
            page = f"<html><body>token {auth} is not valid here</body></html>".encode()
            return http_response(200, page, "text/html")
        return await super()._response(method, path)


def middleware(app: Any, config: Any, clock: FakeClock, **options: Any) -> TierRoutingMiddleware:
    return TierRoutingMiddleware(
        app,
        config=config,
        routes=[CHAT],
        registry=CollectorRegistry(),
        # A lone failure counts at once here: these tests read the logs a counted failure writes.
        health=HealthTracker(
            HealthConfig(initial_backoff=30.0, unconfirmed_threshold=1), clock=clock
        ),
        rng=random.Random(5),
        **options,
    )


async def test_no_secret_reaches_any_log_record(
    capture: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_KEY", "sk-secret-DDD")
    clock = FakeClock()
    provider = Provider()
    async with EchoingControlPlane() as plane:
        source = ControlPlaneSource(
            plane.url,
            api_key_env="TEST_KEY",
            headers={"x-client-secret": "sk-secret-EEE"},
            timeout=0.5,
        )
        mw = middleware(provider, source, clock)
        try:
            # The first request waits for the control plane, which gets the key.
            for i in range(4):
                assert (await send(mw, "simple", session=f"conv-{i % 2}")).status == 200
            assert plane.requests[0].headers["authorization"] == "Bearer sk-secret-DDD"
            assert plane.requests[0].headers["x-client-secret"] == "sk-secret-EEE"
            assert await mw.session_count() == 2

            # A failing model: backed off, the request retried on the other one.
            provider.status["gpt-4o-mini"] = 500
            for i in range(12):
                assert (await send(mw, "simple", session=f"retry-{i}")).status == 200
            assert "gpt-4o-mini" in provider.models  # it was tried, failed and backed off

            # A tier's only model fails, then the tier is unavailable: 503s.
            provider.status["claude-opus"] = 503
            assert (await send(mw, "complex")).status == 503
            unavailable = await send(mw, "complex", session="conv-9")
            assert unavailable.status == 503
            assert unavailable.headers["x-tier-attempts"] == "0"

            # The app raising on a model: a failure too; the exception goes to the server.
            provider.raise_for.add("gpt-4o")
            with pytest.raises(RuntimeError, match="exploded"):
                await send(mw, "moderate")

            # The backoffs run out and the models answer again: recoveries.
            clock.advance(31.0)
            provider.status.clear()
            provider.raise_for.clear()
            assert (await send(mw, "complex", session="conv-9")).status == 200
            assert (await send(mw, "moderate")).status == 200
            for i in range(20):
                await send(mw, "simple", session=f"after-{i}")

            # The control plane failing in every way it can, then recovering with a new config.
            for behaviour in (
                "html",
                "error500",
                "truncated",
                "truncated_json",
                "failure",
                "empty_tiers",
                "zero_cost",
                "echo_failure",
                "echo_invalid",
                "echo_html",
                "slow",
            ):
                plane.behaviour = behaviour
                await mw.configs.refresh()
                assert mw.configs.last_error is not None, behaviour
            monkeypatch.setenv("TEST_KEY", "sk-secret-DDD\x01")  # not a valid header value
            await mw.configs.refresh()
            monkeypatch.delenv("TEST_KEY")
            await mw.configs.refresh()
            monkeypatch.setenv("TEST_KEY", "sk-secret-DDD")
            await plane.stop()
            await mw.configs.refresh()  # connection refused
            await plane.start()
            plane.serve("2")
            await mw.configs.refresh()
            assert mw.configs.last_error is None
            assert mw.config is not None
            assert mw.config.version == "2"
            assert (await send(mw, "simple", session="conv-0")).status == 200
        finally:
            await mw.aclose()

    records = capture.records
    messages = {r.getMessage().split(":")[0] for r in records if r.name == "tier_middleware"}
    for expected in (
        "model backed off",
        "model recovered",
        "tier config adopted",
        "tier config changed",
        "tier config refresh failed again",
        "tier config refresh recovered after 14 failed attempts",
    ):
        assert expected in messages, (expected, sorted(messages))
    assert any(m.startswith("tier config refresh from ") for m in messages)
    assert leaks(records) == []


async def refresh_with_api_key_header(capture: pytest.LogCaptureFixture, value: str) -> str | None:
    """One refresh from a control plane, sending `value` as the x-api-key header; asserts that
    it logged one warning, the failed refresh, and no secret. Returns the refresh's error."""
    async with ControlPlane() as plane:
        source = ControlPlaneSource(plane.url, headers={"x-api-key": value})
        mw = middleware(Provider(), source, FakeClock(), fallback=CONFIG)
        try:
            await mw.configs.refresh()
            error = mw.configs.last_error
        finally:
            await mw.aclose()
    ours = [r for r in capture.records if r.name == "tier_middleware" and r.levelno > 20]
    assert [(r.levelname, r.msg.split(":")[0]) for r in ours] == [
        ("WARNING", "tier config refresh from %s failed")
    ]
    assert leaks(capture.records) == []
    return error


async def test_a_header_value_with_a_trailing_newline_is_not_logged(
    capture: pytest.LogCaptureFixture,
) -> None:
    # A key read from a file (`open("key").read()`) ends in a newline.
    assert await refresh_with_api_key_header(capture, "sk-secret-EEE\n") is not None


async def test_a_non_ascii_header_value_is_a_fetch_error_without_the_value(
    capture: pytest.LogCaptureFixture,
) -> None:
    error = await refresh_with_api_key_header(capture, "sk-secret-EEE\u00e9")
    assert error is not None
    assert "x-api-key" in error


async def test_successful_requests_log_nothing_above_debug(
    capture: pytest.LogCaptureFixture,
) -> None:
    provider = Provider()
    mw = middleware(provider, CONFIG, FakeClock())
    try:
        for i in range(100):
            tier = ("simple", "moderate", "complex")[i % 3]
            session = (
                f"s-{(i // 2) % 10}" if i % 2 else None
            )  # created, reused and upgraded sessions
            result = await send(mw, tier, session=session)
            assert result.status == 200
        # Callers' mistakes are not the operator's news either.
        for tier in ("unknown", "", "x" * 500):
            assert (await send(mw, tier)).status == 400
        assert (await send(mw, "simple", session="bad id!")).status == 400
    finally:
        await mw.aclose()
    assert len(provider.calls) == 100
    assert await mw.session_count() == 10
    loud = [(r.name, r.levelname, r.getMessage()) for r in capture.records if r.levelno > 10]
    assert loud == []
    assert leaks(capture.records) == []


def transitions(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "tier_middleware" and r.levelno >= logging.INFO]


async def test_health_transitions_are_logged_once_with_structured_fields(
    capture: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    provider = Provider()
    mw = middleware(provider, CONFIG, clock)
    try:
        provider.status["opus"] = 503
        assert (await send(mw, "complex")).status == 503
        [backoff] = transitions(capture)
        assert backoff.levelno == logging.WARNING
        assert backoff.getMessage() == "model backed off"
        assert (backoff.provider, backoff.model) == ("anthropic", "opus")  # type: ignore[attr-defined]
        assert backoff.consecutive_failures == 1  # type: ignore[attr-defined]
        assert backoff.backoff_seconds == 30.0  # type: ignore[attr-defined]

        # 503s while backed off are not transitions.
        for _ in range(5):
            assert (await send(mw, "complex")).headers["x-tier-attempts"] == "0"
        assert len(transitions(capture)) == 1

        # The half-open probe fails: a second, doubled backoff.
        clock.advance(30.0)
        assert (await send(mw, "complex")).status == 503
        assert (await send(mw, "complex")).headers["x-tier-attempts"] == "0"
        second = transitions(capture)[1]
        assert second.levelno == logging.WARNING
        assert second.getMessage() == "model backed off"
        assert (second.provider, second.model) == ("anthropic", "opus")  # type: ignore[attr-defined]
        assert second.consecutive_failures == 2  # type: ignore[attr-defined]
        assert second.backoff_seconds == 60.0  # type: ignore[attr-defined]

        # The next probe succeeds.
        clock.advance(60.0)
        provider.status.clear()
        assert (await send(mw, "complex")).status == 200
        assert (await send(mw, "complex")).status == 200
        records = transitions(capture)
        assert len(records) == 3
        recovered = records[2]
        assert recovered.levelno == logging.INFO
        assert recovered.getMessage() == "model recovered"
        assert (recovered.provider, recovered.model) == ("anthropic", "opus")  # type: ignore[attr-defined]
        assert recovered.previous_failures == 2  # type: ignore[attr-defined]

        # A retry onto a model that never failed: one backoff for the failed one, no recovery
        # for the one that answered.
        provider.status["mini"] = 500
        for _ in range(10):
            assert (await send(mw, "simple")).status == 200
        assert "mini" in provider.models
        new = transitions(capture)[3:]
        assert [(r.getMessage(), r.provider, r.model) for r in new] == [  # type: ignore[attr-defined]
            ("model backed off", "openai", "mini")
        ]
    finally:
        await mw.aclose()
    assert leaks(capture.records) == []
