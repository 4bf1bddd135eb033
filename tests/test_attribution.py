"""The attribution rules on their own: verdicts from statuses and from the exceptions real SDKs
and HTTP clients raise, and the evidence a failure no request got past leaves behind."""

from __future__ import annotations

import email.utils
import json
import time
from typing import Any

import anthropic
import anyio
import fastapi
import httpx
import httpx2
import openai
import pytest
import starlette.exceptions
from hypothesis import given, settings
from hypothesis import strategies as st

from _clock import FakeClock
from asgi_harness import call
from configs import weighted
from tier_middleware import HealthConfig, HealthTracker, TierConfig, TierRoutingMiddleware
from tier_middleware._attribution import (
    Evidence,
    Verdict,
    judge_exception,
    judge_status,
    parse_retry_after,
    retry_after_of,
    status_of,
)
from tier_middleware._options import DEFAULT_FAILURE_STATUSES

FAILURES = DEFAULT_FAILURE_STATUSES
CONFIG = TierConfig.load(weighted())
M, C, A, S = Verdict.MODEL_FAILURE, Verdict.CALLER_ERROR, Verdict.APP_ERROR, Verdict.SUCCESS


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        *[(200, S), (204, S), (304, S)],
        *[(400, C), (401, C), (404, C), (408, M), (413, C), (422, C)],
        *[(429, M), (500, M), (502, M), (503, M), (504, M), (529, M), (501, A), (505, A)],
    ],
)
def test_statuses(status: int, verdict: Verdict) -> None:
    assert judge_status(status, FAILURES) is verdict


def test_failure_statuses_are_the_callers_to_choose() -> None:
    assert judge_status(408, frozenset({500})) is C
    assert judge_status(429, frozenset({500})) is C


# -- exceptions of the real SDKs and clients ----------------------------------------------------


def openai_error(cls: type[openai.APIStatusError], status: int, **headers: str) -> Exception:
    request = httpx2.Request("POST", "http://provider/v1/chat/completions")
    response = httpx2.Response(status, headers=headers, request=request)
    return cls("provider said no", response=response, body=None)


def anthropic_error(cls: type[anthropic.APIStatusError], status: int, **headers: str) -> Exception:
    request = httpx2.Request("POST", "http://provider/v1/messages")
    response = httpx2.Response(status, headers=headers, request=request)
    return cls("provider said no", response=response, body=None)


def httpx_status(module: Any, status: int, **headers: str) -> Exception:
    request = module.Request("POST", "http://provider/v1/chat/completions")
    response = module.Response(status, headers=headers, request=request)
    return module.HTTPStatusError("bad status", request=request, response=response)


OPENAI_REQUEST = httpx2.Request("POST", "http://provider/v1/chat/completions")

CASES: list[tuple[str, Exception, Verdict, float | None]] = [
    ("openai 400", openai_error(openai.BadRequestError, 400), C, None),
    ("openai 401", openai_error(openai.AuthenticationError, 401), C, None),
    ("openai 404", openai_error(openai.NotFoundError, 404), C, None),
    ("openai 422", openai_error(openai.UnprocessableEntityError, 422), C, None),
    (
        "openai 429",
        openai_error(openai.RateLimitError, 429, **{"retry-after": "20"}),
        M,
        20.0,
    ),
    (
        "openai 503 with retry-after-ms",
        openai_error(openai.InternalServerError, 503, **{"retry-after-ms": "1500"}),
        M,
        1.5,
    ),
    ("openai timeout", openai.APITimeoutError(request=OPENAI_REQUEST), M, None),
    (
        "openai connection",
        openai.APIConnectionError(message="refused", request=OPENAI_REQUEST),
        M,
        None,
    ),
    ("anthropic 400", anthropic_error(anthropic.BadRequestError, 400), C, None),
    (
        "anthropic 529 overloaded",
        anthropic_error(anthropic.InternalServerError, 529, **{"retry-after": "3"}),
        M,
        3.0,
    ),
    (
        "anthropic 501",
        anthropic_error(anthropic.InternalServerError, 501),
        A,  # not in failure_statuses: an app error, health unchanged
        None,
    ),
    (
        "anthropic 429",
        anthropic_error(anthropic.RateLimitError, 429, **{"Retry-After": "4"}),
        M,
        4.0,
    ),
    ("httpx 400", httpx_status(httpx, 400), C, None),
    ("httpx 502", httpx_status(httpx, 502, **{"retry-after": "9"}), M, 9.0),
    ("httpx2 413", httpx_status(httpx2, 413), C, None),
    ("httpx2 504", httpx_status(httpx2, 504), M, None),
    ("httpx read timeout", httpx.ReadTimeout("slow"), M, None),
    ("httpx2 connect error", httpx2.ConnectError("refused"), M, None),
    (
        "starlette 429",
        starlette.exceptions.HTTPException(429, headers={"Retry-After": "7"}),
        M,
        7.0,
    ),
    ("fastapi 404", fastapi.HTTPException(404), C, None),
    ("fastapi 200 (the app failed after a good answer)", fastapi.HTTPException(200), A, None),
    ("asyncio timeout", TimeoutError(), M, None),
    ("connection reset", ConnectionResetError(), M, None),
    ("a plain crash", RuntimeError("boom"), M, None),
]


@pytest.mark.parametrize(
    ("name", "exc", "verdict", "retry_after"), CASES, ids=[c[0] for c in CASES]
)
def test_exceptions_are_judged_by_the_status_they_carry(
    name: str, exc: Exception, verdict: Verdict, retry_after: float | None
) -> None:
    assert judge_exception(exc, FAILURES) == (verdict, retry_after)


@pytest.mark.parametrize(
    "exc",
    [
        openai.APITimeoutError(request=OPENAI_REQUEST),
        openai.APIConnectionError(message="refused", request=OPENAI_REQUEST),
        anthropic.APITimeoutError(request=httpx2.Request("POST", "http://p/v1/messages")),
        httpx.ConnectTimeout("slow"),
        httpx.RemoteProtocolError("broken"),
        httpx2.ReadTimeout("slow"),
        TimeoutError(),
        ConnectionRefusedError(),
    ],
)
def test_timeouts_and_connection_errors_are_model_failures(exc: Exception) -> None:
    assert judge_exception(exc, FAILURES) == (M, None)


class Odd(Exception):
    def __init__(self, status_code: Any = None, response: Any = None) -> None:
        super().__init__("odd")
        self.status_code = status_code
        self.response = response


class RaisingHeaders:
    def get(self, name: str) -> str:
        raise RuntimeError("broken headers")


class Holder:
    def __init__(self, **attributes: Any) -> None:
        self.__dict__.update(attributes)


@pytest.mark.parametrize(
    "exc",
    [
        Odd("400"),  # not an int
        Odd(True),  # a bool is no status
        Odd(400.0),
        Odd(42),  # out of range
        Odd(600),
        Odd(-1),
        Odd(None, Holder(status_code="503")),
        Odd(None, Holder(status_code=10**9)),
        Odd(None, object()),
    ],
)
def test_a_status_that_is_not_a_plausible_int_makes_a_plain_exception(exc: Exception) -> None:
    assert judge_exception(exc, FAILURES) == (M, None)


def test_unreadable_retry_after_headers_are_ignored() -> None:
    broken = Odd(503, Holder(status_code=503, headers=RaisingHeaders()))
    assert judge_exception(broken, FAILURES) == (M, None)
    no_get = Odd(429, Holder(status_code=429, headers=[("retry-after", "5")]))
    assert judge_exception(no_get, FAILURES) == (M, None)


# -- Retry-After parsing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ms", "seconds", "expected"),
    [
        ("2500", "9", 2.5),  # retry-after-ms first
        (None, "9", 9.0),
        (b"250", None, 0.25),
        (None, b" 12 ", 12.0),
        ("junk", "3", 3.0),  # a bad ms value falls back to Retry-After
        (None, "0", None),
        (None, "-5", None),
        (None, "inf", None),
        (None, "nan", None),
        (None, "soon", None),
        (None, "", None),
        (None, None, None),
        (None, 7, None),  # not header text
    ],
)
def test_parse_retry_after(ms: Any, seconds: Any, expected: float | None) -> None:
    assert parse_retry_after(ms, seconds) == expected


def test_retry_after_as_an_http_date() -> None:
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    parsed = parse_retry_after(None, when)
    assert parsed is not None
    assert 110 < parsed <= 121
    past = email.utils.formatdate(time.time() - 120, usegmt=True)
    assert parse_retry_after(None, past) is None


def test_retry_after_of_asgi_headers_reads_either_case() -> None:
    assert retry_after_of([(b"Retry-After", b"30")]) == 30.0
    assert retry_after_of([(b"retry-after", b"30"), (b"Retry-After-Ms", b"500")]) == 0.5
    assert retry_after_of([(b"content-type", b"application/json")]) is None


# -- evidence -----------------------------------------------------------------------------------

A_KEY, B_KEY = ("openai", "a"), ("google", "b")


def test_failures_of_distinct_bodies_agree_at_the_threshold() -> None:
    evidence = Evidence(3, 60.0, FakeClock())
    assert not evidence.add(A_KEY, 1)
    assert not evidence.add(A_KEY, 1)  # the same body again (a client or SDK retry) counts once
    assert not evidence.add(A_KEY, 1)
    assert evidence.pending(A_KEY) == 1
    assert not evidence.add(A_KEY, 2)
    assert evidence.add(A_KEY, 3)
    assert evidence.pending(A_KEY) == 0  # used up by the agreement
    assert not evidence.add(A_KEY, 4)


def test_evidence_older_than_the_window_no_longer_counts() -> None:
    clock = FakeClock()
    evidence = Evidence(3, 60.0, clock)
    evidence.add(A_KEY, 1)
    clock.advance(30)
    evidence.add(A_KEY, 2)
    clock.advance(31)  # body 1 is now 61 s old
    assert evidence.pending(A_KEY) == 1
    assert not evidence.add(A_KEY, 3)
    assert evidence.add(A_KEY, 4)


def test_a_body_that_failed_on_two_models_is_a_suspect_for_the_window() -> None:
    clock = FakeClock()
    evidence = Evidence(3, 60.0, clock)
    evidence.add(A_KEY, 7)
    assert not evidence.suspect(7)
    evidence.add(A_KEY, 7)
    assert not evidence.suspect(7)  # the same model twice is not two models
    evidence.add(B_KEY, 7)
    assert evidence.suspect(7)
    assert not evidence.suspect(8)
    clock.advance(59)
    assert evidence.suspect(7)
    clock.advance(1)
    assert not evidence.suspect(7)


def test_evidence_stays_bounded() -> None:
    evidence = Evidence(3, 60.0, FakeClock(), max_bodies=100)
    for body in range(10_000):
        evidence.add(A_KEY, body)
        evidence.add(B_KEY, body)
    assert len(evidence) == 100
    assert all(len(held) < 3 for held in evidence.held.values())
    assert evidence.suspect(9_999)
    assert not evidence.suspect(0)  # forgotten first


def test_a_success_of_the_model_clears_what_was_held_against_it() -> None:
    health = HealthTracker(HealthConfig(), clock=FakeClock())
    health.evidence.add(A_KEY, 1)
    health.evidence.add(A_KEY, 2)
    health.evidence.add(B_KEY, 1)
    assert health.status(*A_KEY).unconfirmed_failures == 2
    health.record_success(*A_KEY)
    assert health.status(*A_KEY).unconfirmed_failures == 0
    assert health.status(*B_KEY).unconfirmed_failures == 1
    assert not health.evidence.add(A_KEY, 3)  # counting starts again


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"unconfirmed_threshold": 0}, "unconfirmed_threshold"),
        ({"unconfirmed_threshold": 2.5}, "unconfirmed_threshold"),
        ({"unconfirmed_threshold": True}, "unconfirmed_threshold"),
        ({"unconfirmed_window": -1.0}, "unconfirmed_window"),
        ({"unconfirmed_window": float("nan")}, "unconfirmed_window"),
    ],
)
def test_evidence_settings_are_validated(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        HealthConfig(**kwargs)


# -- property: caller errors never touch health -------------------------------------------------

CALLER_STATUSES = [s for s in range(400, 500) if s not in (408, 429)]


def caller_error(kind: str, status: int) -> Exception | None:
    """A caller error in one of the forms an app produces it (None: answer with the status)."""
    if kind == "openai":
        return openai_error(openai.APIStatusError, status)
    if kind == "anthropic":
        return anthropic_error(anthropic.APIStatusError, status)
    if kind == "httpx":
        return httpx_status(httpx, status)
    if kind == "httpx2":
        return httpx_status(httpx2, status)
    if kind == "starlette":
        return starlette.exceptions.HTTPException(status)
    return None


class CallerErrors:
    """An app whose every answer is a caller error, as the body says: a response status or
    an exception of a real SDK or client carrying it."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = json.loads((await receive())["body"])
        await anyio.sleep(body["delay"])  # let concurrent requests interleave
        exc = caller_error(body["kind"], body["status"])
        if exc is not None:
            raise exc
        await send({"type": "http.response.start", "status": body["status"], "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


ERROR = st.fixed_dictionaries(
    {
        "tier": st.sampled_from(["simple", "moderate", "complex"]),
        "kind": st.sampled_from(
            ["response", "openai", "anthropic", "httpx", "httpx2", "starlette"]
        ),
        "status": st.sampled_from(CALLER_STATUSES),
        "delay": st.sampled_from([0, 0, 0.001]),
        "session": st.sampled_from([None, "s1", "s2"]),
    }
)


@settings(max_examples=60, deadline=None)
@given(batches=st.lists(st.lists(ERROR, min_size=1, max_size=6), min_size=1, max_size=6))
def test_no_sequence_of_caller_errors_changes_any_models_health(
    batches: list[list[dict[str, Any]]],
) -> None:
    clock = FakeClock()
    health = HealthTracker(HealthConfig(initial_backoff=30.0), clock=clock)
    # Some history to keep intact: one model backed off, one on probation, one with evidence.
    health.record_failure("anthropic", "haiku")
    health.record_failure("openai", "4o")
    clock.advance(31.0)
    health.evidence.add(("anthropic", "opus"), 12345)
    models = [(m.provider, m.model) for t in CONFIG.tier_order for m in CONFIG.models(t)]
    before = {key: health.status(*key) for key in models}
    mw = TierRoutingMiddleware(
        CallerErrors(), config=CONFIG, routes=["/v1/chat/completions"], health=health
    )

    async def one(error: dict[str, Any]) -> None:
        headers = [("content-type", "application/json")]
        if error["session"]:
            headers.append(("x-session-id", error["session"]))
        raised: Exception | None = None
        try:
            result = await call(mw, json.dumps(error).encode(), headers=headers)
        except Exception as exc:  # the app's own exception, unchanged
            raised = exc
        if raised is not None:
            assert status_of(raised) == error["status"]
        elif result.status != error["status"]:  # 4o's one probe slot was taken: our own 503
            # (for moderate, or a session that a moderate request raised, never to go down)
            assert (result.headers["x-tier"], result.status) == ("moderate", 503)
            assert result.json()["error"]["code"] == "service_unavailable"

    async def run() -> None:
        for batch in batches:
            async with anyio.create_task_group() as tg:
                for error in batch:
                    tg.start_soon(one, error)

    anyio.run(run)
    assert {key: health.status(*key) for key in models} == before
