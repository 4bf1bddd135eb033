"""Fuzzing the request surface: whatever a client sends, the middleware answers with the app's
response or a documented 4xx JSON error, and never raises or answers 500."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgi_harness import Client, Provider, http_scope
from configs import weighted
from tier_middleware import RequestLimits, RoutePolicy, TierRoutingMiddleware

CONFIG = weighted()
CODES = {
    400: {
        "invalid_json",
        "invalid_tier",
        "conflicting_tier",
        "tier_required",
        "invalid_session_id",
    },
    403: {"tier_not_allowed"},
    413: {"request_too_large"},
}
ROUTES = {
    "/v1/chat/completions": RoutePolicy(),
    "/strict": RoutePolicy(require_tier=True, allowed_tiers=["simple", "moderate"]),
    "/default": RoutePolicy(default_tier="simple"),
}

tiers = st.one_of(
    st.sampled_from(["simple", " MODERATE ", "complex", "tier:simple", "", "gold"]),
    st.text(max_size=80),
    st.integers(),
    st.floats(allow_nan=True),
    st.none(),
    st.booleans(),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
models = st.one_of(
    st.sampled_from(["tier:simple", "tier:", "TIER:complex", "tier:gold", "gpt-4o"]),
    st.text(max_size=40).map(lambda t: "tier:" + t),
    st.integers(),
    st.none(),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def json_objects(draw: st.DrawFn) -> bytes:
    obj: dict[str, Any] = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=5))
    if draw(st.booleans()):
        obj["tier"] = draw(tiers)
    if draw(st.booleans()):
        obj["model"] = draw(models)
    if draw(st.booleans()):
        obj["messages"] = [{"role": "user", "content": draw(st.text(max_size=30))}]
    return json.dumps(obj, allow_nan=True).encode()


bodies = st.one_of(
    json_objects(),
    json_values.map(lambda v: json.dumps(v).encode()),  # arrays, strings, numbers at the top
    st.binary(max_size=200),  # invalid UTF-8 and garbage
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),  # deep nesting
    st.integers(1, 3000).map(lambda n: b'{"tier": "simple", "a": ' + b"[" * n + b"]" * n + b"}"),
    st.integers(20, 400).map(lambda n: b'{"tier": "simple", "n": 1' + b"0" * n + b"}"),
    # raw bytes (invalid UTF-8 among them) inside a key or a nested string of a valid object
    st.tuples(st.binary(max_size=8), st.binary(max_size=8)).map(
        lambda kv: (
            b'{"tier": "simple", "'
            + kv[0].replace(b'"', b"")
            + b'": ["'
            + kv[1].replace(b'"', b"").replace(b"\\", b"")
            + b'"]}'
        )
    ),
    st.sampled_from(
        [
            b'{"tier": "simple", "tier": "complex"}',  # duplicate keys that disagree: a 400
            b'{"tier": "simple", "ti\\u0065r": "simple", "model": "tier:simple"}',
            b'{"tier": "simple", "x": NaN, "y": -Infinity}',
            b'{"tier": "simple", "s": "\\ud800"}',
            b'{"tier": "simple"',  # truncated
            b"\xef\xbb\xbf{}",  # a byte-order mark
            b"",
        ]
    ),
)
header_values = st.one_of(
    st.sampled_from([b"simple", b" complex ", b"", b"sim\x00ple", b"\xff\xfe", b"gold"]),
    st.binary(max_size=40),
    st.text(max_size=140).map(lambda t: t.encode("utf-8")),
)
content_types = st.sampled_from(
    [b"application/json", b"application/json; charset=utf-8", b"text/plain", b"app/x+json", None]
)
paths = st.one_of(st.sampled_from(list(ROUTES)), st.text(max_size=30).map(lambda t: "/" + t))


def run(
    mw: TierRoutingMiddleware, body: bytes, headers: list[tuple[bytes, bytes]], path: str
) -> Any:
    scope = http_scope(path)
    scope["headers"] = headers
    # The body arrives split in two, as servers deliver large bodies.
    client = Client(chunks=[body[: len(body) // 2], body[len(body) // 2 :]], leave_after_body=True)

    async def go() -> None:
        await asyncio.wait_for(mw(scope, client.receive, client.send), timeout=5)

    asyncio.run(go())
    return client.sent


def check(sent: list[dict[str, Any]], provider: Provider, calls_before: int) -> None:
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1
    status = starts[0]["status"]
    assert status != 500
    if len(provider.calls) > calls_before:
        assert status == 200  # the fake provider's own answer
        return
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    error = json.loads(body)["error"]
    assert error["code"] in CODES[status], (status, error)
    assert set(error) == {"message", "type", "param", "code"}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=bodies,
    tier=st.none() | header_values,
    session=st.none() | header_values,
    content_type=content_types,
    path=paths,
    routes_none=st.booleans(),
)
def test_no_input_makes_the_middleware_fail(
    body: bytes,
    tier: bytes | None,
    session: bytes | None,
    content_type: bytes | None,
    path: str,
    routes_none: bool,
) -> None:
    provider = Provider()
    mw = TierRoutingMiddleware(
        provider,
        config=CONFIG,
        routes=None if routes_none else ROUTES,
        limits=RequestLimits(max_body_bytes=4096),
    )
    headers = []
    if content_type is not None:
        headers.append((b"content-type", content_type))
    if tier is not None:
        headers.append((b"X-Tier", tier))
    if session is not None:
        headers.append((b"x-session-id", session))
    sent = run(mw, body, headers, path)
    check(sent, provider, 0)
    if provider.calls:
        received = provider.calls[0]
        if received["headers"].get("x-tier"):
            # Routed: the app got valid JSON with the model set, or the original non-JSON body.
            if b"json" in (content_type or b"") and received["body"]:
                data = json.loads(received["body"])
                assert data["model"] == received["headers"]["x-tier-model"]
                assert "tier" not in data
        else:
            assert received["body"] == body  # not ours: untouched, byte for byte
