"""TierRoutingMiddleware on a raw ASGI harness: the request flow and body-replay edge cases."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from _clock import FakeClock
from asgi_harness import Client, Provider, call, http_scope
from configs import weighted
from tier_middleware import (
    HealthConfig,
    HealthTracker,
    RequestLimits,
    RetryConfig,
    RoutePolicy,
    TierConfig,
    TierRoutingMiddleware,
    current_selection,
)

pytestmark = pytest.mark.anyio

CONFIG = weighted("t1")
ROUTE = "/v1/chat/completions"
SIMPLE = {"mini", "haiku"}


# A failure that no request got past counts at once: for the tests of what a counted failure
# does to a lone model (the agreement of distinct requests is tested in test_attribution.py).
AT_ONCE = HealthConfig(unconfirmed_threshold=1)


def make(
    app: Any = None,
    *,
    clock: FakeClock | None = None,
    health_config: HealthConfig | None = None,
    **options: Any,
) -> tuple[TierRoutingMiddleware, Provider]:
    provider = app or Provider()
    options.setdefault("routes", [ROUTE])
    health = HealthTracker(health_config or HealthConfig(), clock=clock or FakeClock())
    mw = TierRoutingMiddleware(provider, config=CONFIG, health=health, **options)
    return mw, provider


def chat(**fields: Any) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], **fields}).encode()


# -- reading the tier --------------------------------------------------------------------------


async def test_body_tier_is_replaced_by_the_chosen_model() -> None:
    mw, provider = make()
    result = await call(mw, chat(tier="simple", temperature=0.5))
    assert result.status == 200
    [seen] = provider.calls
    received = json.loads(seen["body"])
    assert "tier" not in received
    assert received["model"] in SIMPLE
    assert received["messages"] == [{"role": "user", "content": "hi"}]
    assert received["temperature"] == 0.5
    assert seen["headers"]["content-length"] == str(len(seen["body"]))
    assert seen["headers"]["x-tier"] == "simple"
    assert seen["headers"]["x-tier-model"] == received["model"]
    assert result.headers["x-tier-model"] == received["model"]
    assert result.headers["x-tier-attempts"] == "1"


async def test_model_prefix_and_mixed_case_header_name() -> None:
    mw, provider = make()
    await call(mw, chat(model="tier:Moderate"))
    await call(mw, chat(), headers=[("Content-Type", "application/json"), ("X-Tier", " COMPLEX ")])
    assert [json.loads(c["body"])["model"] for c in provider.calls] == ["4o", "opus"]


async def test_sources_that_agree_are_fine_and_disagreeing_ones_are_400() -> None:
    mw, provider = make()
    ok = await call(mw, chat(tier="simple", model="tier:SIMPLE"))
    assert ok.status == 200
    bad = await call(
        mw,
        chat(tier="simple"),
        headers=[("content-type", "application/json"), ("x-tier", "complex")],
    )
    assert bad.status == 400
    assert bad.json()["error"]["code"] == "conflicting_tier"
    assert len(provider.calls) == 1


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2, 3]", "invalid_json"),
        (b'"a string"', "invalid_json"),
        (b"\xff\xfe{}", "invalid_json"),
        (b'{"\xff": 1, "tier": "simple"}', "invalid_json"),  # invalid UTF-8 in a key
        (b'{"tier": "simple", "\xc3": 1}', "invalid_json"),
        (chat(tier=3), "invalid_tier"),
        (chat(tier=["simple"]), "invalid_tier"),
        (chat(tier=None), "invalid_tier"),
        (chat(tier=""), "invalid_tier"),
        (chat(tier="   "), "invalid_tier"),
        (chat(tier="x" * 10_000), "invalid_tier"),
        (chat(tier="gold"), "invalid_tier"),
        (chat(model="tier:"), "invalid_tier"),
        (chat(tier="simple", model="tier:complex"), "conflicting_tier"),
    ],
)
async def test_bad_input_gets_a_documented_400_and_never_reaches_the_app(
    body: bytes, code: str
) -> None:
    mw, provider = make()
    result = await call(mw, body)
    assert result.status == 400
    error = result.json()["error"]
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    assert len(error["message"]) < 300  # a 10 KB tier is not echoed back
    assert result.headers["content-type"] == "application/json"
    assert provider.calls == []


async def test_unknown_tier_lists_the_valid_ones() -> None:
    mw, _ = make()
    result = await call(mw, chat(tier="platinum"))
    assert "simple, moderate, complex" in result.json()["error"]["message"]


async def test_header_tier_with_control_characters_or_non_ascii_is_rejected() -> None:
    mw, provider = make()
    for value in ("sim\x01ple", "simplé"):
        result = await call(
            mw, chat(), headers=[("content-type", "application/json"), ("x-tier", value)]
        )
        assert result.json()["error"]["code"] == "invalid_tier"
    assert provider.calls == []


async def test_no_tier_passes_through_untouched_on_an_opted_in_route() -> None:
    mw, provider = make()
    body = b'{"model":  "gpt-4o", "messages": []}'
    result = await call(mw, body)
    assert result.status == 200
    assert provider.calls[0]["body"] == body  # byte for byte, spacing included
    assert "x-tier" not in result.headers


async def test_default_required_and_allowed_tiers() -> None:
    routes = {
        "/default": RoutePolicy(default_tier="moderate"),
        "/required": RoutePolicy(require_tier=True),
        "/cheap": RoutePolicy(allowed_tiers=["simple"]),
    }
    mw, provider = make(routes=routes)
    assert (await call(mw, chat(), path="/default")).headers["x-tier"] == "moderate"
    required = await call(mw, chat(), path="/required")
    assert (required.status, required.json()["error"]["code"]) == (400, "tier_required")
    denied = await call(mw, chat(tier="complex"), path="/cheap")
    assert (denied.status, denied.json()["error"]["code"]) == (403, "tier_not_allowed")
    assert (await call(mw, chat(tier="simple"), path="/cheap")).status == 200
    assert len(provider.calls) == 2


def test_route_policies_naming_unknown_tiers_fail_at_startup() -> None:
    with pytest.raises(ValueError, match="gold"):
        make(routes={"/x": RoutePolicy(default_tier="gold")})
    with pytest.raises(ValueError, match="not in allowed_tiers"):
        RoutePolicy(default_tier="complex", allowed_tiers=["simple"])
    with pytest.raises(ValueError, match="max_attempts"):
        RoutePolicy(max_attempts=0)


async def test_wildcard_routes_match_one_segment() -> None:
    mw, provider = make(routes=["/v1/*/chat"])
    assert (await call(mw, chat(tier="simple"), path="/v1/team-a/chat")).headers["x-tier"]
    deeper = await call(mw, chat(tier="simple"), path="/v1/a/b/chat")
    assert "x-tier" not in deeper.headers
    assert json.loads(provider.calls[1]["body"])["tier"] == "simple"  # untouched


async def test_paths_not_opted_in_are_not_buffered() -> None:
    mw, provider = make()
    client = Client(chunks=[b'{"tier":', b'"simple"}'])
    await call(mw, path="/other", client=client)
    # The app read the body itself, chunk by chunk: nothing was read ahead for it.
    assert provider.calls[0]["body"] == b'{"tier":"simple"}'
    assert "x-tier" not in provider.calls[0]["headers"]


async def test_routes_none_routes_only_requests_that_carry_a_tier() -> None:
    mw, provider = make(routes=None)
    plain = b'{"model": "gpt-4o"}'
    await call(mw, plain, path="/anything")
    await call(mw, b"[not json", path="/anything")  # not ours: the app decides
    await call(mw, chat(tier="simple"), path="/anything")
    assert provider.calls[0]["body"] == plain
    assert provider.calls[1]["body"] == b"[not json"
    assert json.loads(provider.calls[2]["body"])["model"] in SIMPLE


async def test_client_cannot_spoof_the_selection_headers() -> None:
    mw, provider = make()
    await call(
        mw,
        chat(tier="simple"),
        headers=[
            ("content-type", "application/json"),
            ("x-tier-model", "gpt-5-ultra"),
            ("x-tier-provider", "evil"),
        ],
    )
    headers = provider.calls[0]["scope"]["headers"]
    models = [v for k, v in headers if k == b"x-tier-model"]
    assert len(models) == 1
    assert models[0].decode() in SIMPLE


@pytest.mark.parametrize(
    "spoofed",
    [
        [("x-tier-model", "gpt-5-ultra")],  # lowercase and unique: read through a dict
        [("X-Tier-Model", "gpt-5-ultra")],  # mixed case: read one by one
        [("x-tier-model", "a"), ("x-tier-model", "b")],  # repeated
    ],
)
async def test_spoofed_selection_headers_are_dropped_however_they_are_spelled(
    spoofed: list[tuple[str, str]],
) -> None:
    mw, provider = make()
    await call(mw, chat(tier="simple"), headers=[("content-type", "application/json"), *spoofed])
    headers = provider.calls[0]["scope"]["headers"]
    models = [v for k, v in headers if k.lower() == b"x-tier-model"]
    assert len(models) == 1
    assert models[0].decode() in SIMPLE
    lengths = [v for k, v in headers if k.lower() == b"content-length"]
    assert lengths == [str(len(provider.calls[0]["body"])).encode()]


@pytest.mark.parametrize(
    ("tiers", "status"), [(["simple", "simple"], 200), (["simple", "complex"], 400)]
)
async def test_a_repeated_tier_header_must_agree_with_itself(tiers: list[str], status: int) -> None:
    mw, provider = make()
    headers = [("content-type", "application/json"), *(("x-tier", t) for t in tiers)]
    result = await call(mw, chat(), headers=headers)
    assert result.status == status
    assert len(provider.calls) == (1 if status == 200 else 0)


async def test_request_headers_as_lists_are_read_like_tuples() -> None:
    mw, provider = make()
    scope = http_scope(headers=[("content-type", "application/json"), ("x-tier", "complex")])
    scope["headers"] = [list(pair) for pair in scope["headers"]]
    result = await call(mw, chat(), scope=scope)
    assert result.status == 200
    assert json.loads(provider.calls[0]["body"])["model"] == "opus"


@pytest.mark.parametrize(
    "extra",
    [
        [(b"x-tier-model", b"forged"), (b"x-request-id", b"r1")],  # lowercase: the dict path
        [(b"X-Tier-Model", b"forged"), (b"X-Request-Id", b"r1")],  # mixed case: the loop
    ],
)
async def test_the_apps_own_x_tier_headers_never_reach_the_client(
    extra: list[tuple[bytes, bytes]],
) -> None:
    mw, provider = make()
    provider.response_headers = extra
    result = await call(mw, chat(tier="simple"))
    assert result.header_list("x-tier-model") == [provider.models[0]]
    assert result.header_list("x-request-id") == ["r1"]
    assert result.header_list("x-tier-attempts") == ["1"]


# -- body buffering and replay ------------------------------------------------------------------


async def test_body_in_several_chunks_is_reassembled() -> None:
    mw, provider = make()
    body = chat(tier="simple", note="x" * 5000)
    client = Client(chunks=[body[:10], body[10:4000], body[4000:]])
    result = await call(mw, client=client)
    assert result.status == 200
    received = json.loads(provider.calls[0]["body"])
    assert received["note"] == "x" * 5000


async def test_chunked_body_gets_a_single_content_length_and_no_transfer_encoding() -> None:
    mw, provider = make()
    headers = [
        ("content-type", "application/json"),
        ("transfer-encoding", "chunked"),
        ("content-length", "999"),
    ]
    await call(mw, [chat(tier="simple")], headers=headers)
    sent = provider.calls[0]["scope"]["headers"]
    lengths = [v for k, v in sent if k == b"content-length"]
    assert lengths == [str(len(provider.calls[0]["body"])).encode()]
    assert not [k for k, _ in sent if k == b"transfer-encoding"]


async def test_disconnect_during_the_body_calls_no_app_and_sends_nothing() -> None:
    mw, provider = make()
    client = Client(chunks=[b'{"tier": "sim', b'ple"}'], disconnect_during_body=True)
    result = await call(mw, client=client)
    assert provider.calls == []
    assert result.messages == []


async def test_body_over_the_cap_is_413_with_or_without_content_length() -> None:
    mw, provider = make(limits=RequestLimits(max_body_bytes=100))
    big = chat(tier="simple", pad="x" * 200)
    declared = await call(
        mw, big, headers=[("content-type", "application/json"), ("content-length", str(len(big)))]
    )
    streamed = await call(mw, [big[:60], big[60:]])
    for result in (declared, streamed):
        assert result.status == 413
        assert result.json()["error"]["code"] == "request_too_large"
    assert provider.calls == []


async def test_body_over_the_cap_passes_through_whole_when_not_ours() -> None:
    mw, provider = make(routes=None, limits=RequestLimits(max_body_bytes=100))
    big = b'{"pad": "' + b"x" * 300 + b'"}'
    await call(mw, [big[:50], big[50:150], big[150:]], path="/upload")
    assert provider.calls[0]["body"] == big


async def test_receive_after_the_body_waits_for_the_real_disconnect() -> None:
    seen: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(await receive())
        seen.append(await receive())  # like Django and streaming responses: wait for disconnect
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    mw, _ = make(app)
    client = Client(chunks=[chat(tier="simple")])
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: call(mw, client=client))
        with anyio.fail_after(2):
            while len(seen) < 1:
                await anyio.lowlevel.checkpoint()
        assert len(seen) == 1  # the second receive is blocked on the client, not answered
        client.disconnect.set()
    assert [m["type"] for m in seen] == ["http.request", "http.disconnect"]
    assert seen[0]["more_body"] is False


async def test_a_disconnect_is_remembered_for_every_later_receive() -> None:
    received: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for _ in range(4):
            received.append((await receive())["type"])
        raise RuntimeError("client went away")

    mw, _ = make(app)
    client = Client(chunks=[chat(tier="simple")], leave_after_body=True)
    with pytest.raises(RuntimeError):
        await call(mw, client=client)
    assert received == ["http.request"] + ["http.disconnect"] * 3
    assert client.received == 2  # the server was asked once for the disconnect, never again
    assert mw.health.unavailable() == []  # a client that left is no provider failure


async def test_each_attempt_gets_its_own_scope_and_state() -> None:
    mw, provider = make()
    provider.status["mini"] = 503
    provider.status["haiku"] = 503
    scope = http_scope()
    scope["state"] = {"outer": 1}
    await call(mw, chat(tier="simple"), scope=scope)
    first, second = (c["scope"] for c in provider.calls)
    assert first is not second
    assert first["state"] is not second["state"]
    assert first["state"]["tier_selection"].model != second["state"]["tier_selection"].model
    assert first["state"]["outer"] == 1
    assert scope["state"] == {"outer": 1}  # the caller's scope is not touched


async def test_non_json_bodies_are_not_rewritten_but_see_the_choice() -> None:
    mw, provider = make()
    audio = b"--b\r\ncontent-disposition: form-data; name=file\r\n\r\n\x00\x01\x02\r\n--b--"
    result = await call(
        mw,
        audio,
        headers=[
            ("content-type", "multipart/form-data; boundary=b"),
            ("content-length", str(len(audio))),
            ("x-tier", "simple"),
        ],
    )
    assert result.status == 200
    assert provider.calls[0]["body"] == audio
    assert provider.calls[0]["headers"]["content-length"] == str(len(audio))
    assert provider.calls[0]["headers"]["x-tier-model"] in SIMPLE


async def test_json_the_fast_parser_refuses_still_reaches_the_app_intact() -> None:
    mw, provider = make()
    body = b'{"tier": "simple", "n": NaN, "s": "\\ud800"}'
    await call(mw, body)
    received = provider.calls[0]["body"]
    parsed = json.loads(received)
    assert math.isnan(parsed["n"])
    assert parsed["s"] == "\ud800"
    assert "tier" not in parsed


# -- outcomes and retries -------------------------------------------------------------------------


async def test_failure_is_retried_once_on_another_model_before_any_byte_is_sent() -> None:
    mw, provider = make()
    provider.status["mini"] = 503
    provider.status["haiku"] = 503
    result = await call(mw, chat(tier="simple"))
    assert sorted(provider.models) == ["haiku", "mini"]
    # The client saw exactly one response: the last failure, unchanged, with our headers.
    assert result.status == 503
    assert result.json() == {"model": provider.models[-1], "ok": False}
    assert result.headers["x-tier-attempts"] == "2"
    assert result.headers["x-tier-model"] == provider.models[-1]


async def test_retry_succeeds_and_the_failed_model_is_backed_off() -> None:
    clock = FakeClock()
    mw, provider = make(clock=clock, rng=random.Random(1))
    provider.status["mini"] = 500
    outcomes = [await call(mw, chat(tier="simple")) for _ in range(10)]
    assert all(r.status == 200 for r in outcomes)
    assert all(r.headers["x-tier-model"] == "haiku" for r in outcomes)
    assert provider.models.count("mini") == 1  # tried once, then left alone
    assert not mw.health.is_available("openai", "mini")


async def test_exception_before_the_response_is_a_failure_and_is_retried() -> None:
    mw, provider = make()
    provider.raise_for.add("mini")
    outcomes = [await call(mw, chat(tier="simple", n=n)) for n in range(20)]
    assert all(r.status == 200 for r in outcomes)
    assert provider.models.count("mini") == 1  # raised once, retried on haiku, left alone
    assert {(p, m) for p, m, _ in mw.health.unavailable()} == {("openai", "mini")}

    # When every model raises, the exception propagates and nothing is proven yet.
    mw, provider = make()
    provider.raise_for.update({"mini", "haiku"})
    with pytest.raises(RuntimeError):
        await call(mw, chat(tier="simple"))
    assert sorted(provider.models) == ["haiku", "mini"]
    assert mw.health.unavailable() == []
    assert mw.health.status("openai", "mini").unconfirmed_failures == 1
    assert mw.health.status("anthropic", "haiku").unconfirmed_failures == 1


async def test_caller_errors_leave_health_unchanged() -> None:
    mw, provider = make()
    provider.status["4o"] = 400
    for _ in range(3):
        result = await call(mw, chat(tier="moderate"))
        assert result.status == 400
        assert result.headers["x-tier-attempts"] == "1"
    assert provider.models == ["4o", "4o", "4o"]
    assert mw.health.unavailable() == []


async def test_failure_retry_after_lengthens_the_backoff() -> None:
    clock = FakeClock()
    mw, provider = make(clock=clock, health_config=AT_ONCE)
    provider.status["4o"] = 429
    provider.response_headers = [(b"Retry-After", b"120")]
    await call(mw, chat(tier="moderate"))
    remaining = mw.health.backoff_remaining("openai", "4o")
    assert remaining == pytest.approx(120)


async def test_max_attempts_one_disables_retry() -> None:
    mw, provider = make(routes={ROUTE: RoutePolicy(max_attempts=1)})
    provider.status["mini"] = provider.status["haiku"] = 502
    result = await call(mw, chat(tier="simple"))
    assert len(provider.calls) == 1
    assert result.status == 502


async def test_failure_after_the_response_started_is_recorded_but_not_retried() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        raise ConnectionError("upstream stream broke")

    mw, _ = make(app, health_config=AT_ONCE)
    client = Client(chunks=[chat(tier="moderate")])
    with pytest.raises(ConnectionError):
        await call(mw, client=client)
    assert [m["type"] for m in client.sent] == ["http.response.start", "http.response.body"]
    assert not mw.health.is_available("openai", "4o")


async def test_cancellation_is_never_swallowed_nor_counted() -> None:
    started = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        started.set()
        await anyio.sleep_forever()

    mw, _ = make(app)
    async with anyio.create_task_group() as tg:
        tg.start_soon(call, mw, chat(tier="moderate"))
        await started.wait()
        tg.cancel_scope.cancel()
    assert mw.health.unavailable() == []


async def test_current_selection_inside_the_app_only() -> None:
    seen = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        seen.append(current_selection())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    mw, _ = make(app)
    await call(mw, chat(tier="complex"))
    assert seen[0] is not None
    assert (seen[0].provider, seen[0].model, seen[0].tier) == ("anthropic", "opus", "complex")
    assert current_selection() is None


# -- 503 short-circuit ----------------------------------------------------------------------------


async def test_no_healthy_model_answers_503_without_calling_the_app() -> None:
    clock = FakeClock()
    mw, provider = make(clock=clock)
    mw.health.record_failure("openai", "4o")  # 30 s backoff
    clock.advance(12.5)
    result = await call(mw, chat(tier="moderate"))
    assert provider.calls == []
    assert result.status == 503
    assert result.json() == {
        "error": {
            "message": result.json()["error"]["message"],
            "type": "service_unavailable",
            "code": "service_unavailable",
            "param": None,
        }
    }
    assert result.headers["retry-after"] == "18"  # ceil(17.5)
    assert result.headers["retry-after-ms"] == "17500"
    assert result.headers["x-tier"] == "moderate"


async def test_retry_after_is_clamped_and_configurable() -> None:
    clock = FakeClock()
    mw, _ = make(clock=clock)
    mw.health.record_failure("openai", "4o", retry_after=900)
    assert (await call(mw, chat(tier="moderate"))).headers["retry-after"] == "60"
    wide, _ = make(clock=clock, retries=RetryConfig(retry_after_bounds=(5, 120)))
    wide.health.record_failure("openai", "4o", retry_after=900)
    result = await call(wide, chat(tier="moderate"))
    assert (result.headers["retry-after"], result.headers["retry-after-ms"]) == ("120", "120000")


async def test_backed_off_tier_recovers_through_a_half_open_probe() -> None:
    clock = FakeClock()
    mw, provider = make(clock=clock, health_config=AT_ONCE)
    provider.status["4o"] = 503
    assert (await call(mw, chat(tier="moderate"))).status == 503  # the app's own 503
    assert (await call(mw, chat(tier="moderate"))).headers["retry-after"] == "30"
    clock.advance(30)
    provider.status.clear()
    assert (await call(mw, chat(tier="moderate"))).status == 200
    assert mw.health.unavailable() == []


# -- pass-through of other scopes -----------------------------------------------------------------


async def test_non_http_scopes_pass_straight_through() -> None:
    seen = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope)

    mw, _ = make(app)
    for kind in ("websocket", "lifespan"):
        scope = {"type": kind, "path": ROUTE}
        await mw(scope, None, None)  # type: ignore[arg-type]
    assert [s["type"] for s in seen] == ["websocket", "lifespan"]


def test_config_can_be_a_tierconfig_or_a_file(tmp_path: Any) -> None:
    path = tmp_path / "tiers.json"
    path.write_text(json.dumps(CONFIG))
    from_file = TierRoutingMiddleware(Provider(), config=path)
    from_obj = TierRoutingMiddleware(Provider(), config=TierConfig.load(CONFIG))
    assert from_file.config == from_obj.config


def nested_body(depth: int) -> bytes:
    return b'{"tier": "simple", "a": ' + b"[" * depth + b"]" * depth + b"}"


async def test_deeply_nested_json_still_reaches_the_app() -> None:
    mw, provider = make()
    depth = 600
    result = await call(mw, nested_body(depth))
    assert result.status == 200
    received = json.loads(provider.calls[0]["body"])
    assert received["model"] in SIMPLE
    nested = received["a"]
    for _ in range(depth - 1):
        nested = nested[0]
    assert nested == []


async def test_json_nested_past_every_parser_is_a_400_not_a_500() -> None:
    mw, provider = make()
    result = await call(mw, nested_body(100_000))
    assert result.status == 400
    assert result.json()["error"]["code"] == "invalid_json"
    assert provider.calls == []


async def test_nested_values_reach_the_app_byte_for_byte() -> None:
    # Only the top level is rewritten: numbers past 64 bits, float spellings, escapes and
    # spacing inside nested values are what the client sent, not a parser's re-rendering.
    nested = (
        b'{"n": 123456789012345678901234567890, "f": 1.0E+2, "z": -0.0, '
        rb'"s": "caf\u00e9 \ud83d\ude00 \"q\"", "big": 1e400,  "a" : [ 1 ,2 ] }'
    )
    mw, provider = make()
    body = b'{"tier": "simple", "seed": 18446744073709551617, "metadata": ' + nested + b"}"
    result = await call(mw, body)
    assert result.status == 200
    received = provider.calls[0]["body"]
    assert nested in received
    assert b'"seed":18446744073709551617' in received
    parsed = json.loads(received)
    assert parsed["seed"] == 2**64 + 1
    assert parsed["metadata"]["n"] == 123456789012345678901234567890
    assert "tier" not in parsed
    assert parsed["model"] in SIMPLE


async def test_invalid_utf8_inside_a_nested_string_is_invalid_json() -> None:
    mw, provider = make()
    body = b'{"tier": "simple", "messages": [{"role": "user", "content": "caf\xe9 \xff"}]}'
    result = await call(mw, body)
    assert result.status == 400
    assert result.json()["error"]["code"] == "invalid_json"
    assert provider.calls == []


async def test_utf8_text_in_nested_strings_reaches_the_app_unchanged() -> None:
    mw, provider = make()
    content = "caf\u00e9 \u00fc\u00df \u65e5\u672c \U0001f600"
    body = json.dumps(
        {"tier": "simple", "messages": [{"role": "user", "content": content}]},
        ensure_ascii=False,
    ).encode()
    result = await call(mw, body)
    assert result.status == 200
    received = provider.calls[0]["body"]
    assert content.encode() in received
    assert json.loads(received)["messages"][0]["content"] == content


async def test_body_crossing_the_cap_in_its_last_chunk_passes_through_complete() -> None:
    mw, provider = make(routes=None, limits=RequestLimits(max_body_bytes=100))
    big = b'{"pad": "' + b"x" * 150 + b'"}'
    await call(mw, [big[:60], big[60:]], path="/upload")  # the second chunk crosses and ends
    assert provider.calls[0]["body"] == big


def test_a_member_nested_past_the_decoder_reads_as_its_container_kind() -> None:
    import msgspec

    from tier_middleware._payload import Payload

    deep = 50_000
    payload = Payload(
        {
            "tier": msgspec.Raw(b"[" * deep + b"]" * deep),
            "model": msgspec.Raw(b'{"a":' * deep + b"1" + b"}" * deep),
        },
        True,
    )
    assert payload.value("tier") == []
    assert payload.value("model") == {}
    assert payload.value("missing") is None


@pytest.mark.parametrize(
    "start_headers",
    [
        [(b"content-type", b"application/json")],  # the dict path
        [(b"Content-Type", b"application/json")],  # the loop
        [(b"content-type", b"application/json"), (b"Set-Cookie", b"a"), (b"set-cookie", b"b")],
    ],
)
async def test_usage_is_counted_however_the_response_headers_are_spelled(
    start_headers: list[tuple[bytes, bytes]],
) -> None:
    from prometheus_client import CollectorRegistry

    reply = json.dumps({"usage": {"prompt_tokens": 7, "completion_tokens": 3}}).encode()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": start_headers})
        await send({"type": "http.response.body", "body": reply})

    registry = CollectorRegistry()
    mw, _ = make(app, registry=registry)
    result = await call(mw, chat(tier="complex"))
    assert result.body == reply
    assert [name for name, _ in result.start["headers"][: len(start_headers)]] == [
        name for name, _ in start_headers
    ]
    labels = {"tier": "complex", "provider": "anthropic", "model": "opus"}
    assert registry.get_sample_value("llm_tokens_total", {**labels, "kind": "input"}) == 7
    assert registry.get_sample_value("llm_tokens_total", {**labels, "kind": "output"}) == 3


async def test_a_503_for_a_session_held_at_a_higher_tier_names_that_tier() -> None:
    mw, _ = make()
    headers = [("content-type", "application/json"), ("x-session-id", "conv-1")]
    assert (await call(mw, chat(tier="moderate"), headers=headers)).status == 200
    mw.health.record_failure("openai", "4o")  # moderate's only model
    result = await call(mw, chat(tier="simple"), headers=headers)  # never down a tier
    assert (result.status, result.headers["x-tier"]) == (503, "moderate")
    assert result.json()["error"]["message"] == (
        "all models for tier 'moderate' are temporarily unavailable"
    )
