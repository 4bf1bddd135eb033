"""What the middleware does at the limits the README names: a member named twice, a body nested
deeper than the parsers go, and a body over the cap answered before it was read.

The last two are about what a client on a real connection sees, so they run uvicorn on loopback
(both of its HTTP implementations) and talk to it over a raw socket.
"""

from __future__ import annotations

import functools
import json
import socket
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from asgi_harness import Provider, call
from configs import two_per_tier
from servers import serve
from tier_middleware import RequestLimits, TierRoutingMiddleware

pytestmark = pytest.mark.anyio

ROUTE = "/v1/chat/completions"
SIMPLE = {"mini", "haiku"}


def middleware(**options: Any) -> tuple[TierRoutingMiddleware, Provider]:
    provider = Provider()
    options.setdefault("routes", [ROUTE])
    return TierRoutingMiddleware(provider, config=two_per_tier(), **options), provider


# -- a member named twice -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        rb'{"tier": "simple", "tier": "complex"}',
        rb'{"tier": "simple", "messages": [], "ti\u0065r": "complex"}',  # the same key, escaped
        rb'{"model": "tier:simple", "model": "tier:complex"}',
        rb'{"model": "gpt-4o", "model": "tier:complex"}',
        rb'{"model": "tier:complex", "model": "gpt-4o"}',
        # written compactly, as the SDKs write JSON: the fast path must see these too
        rb'{"tier":"simple","tier":"complex"}',
        rb'{"tier":"simple","messages":[],"ti\u0065r":"complex"}',
        rb'{"model":"tier:simple","model":"tier:complex"}',
    ],
)
@pytest.mark.parametrize("routes", [[ROUTE], None], ids=["opted-in", "routes=None"])
async def test_a_member_named_twice_with_different_values_is_a_conflict(
    body: bytes, routes: list[str] | None
) -> None:
    """JSON allows a name twice and parsers disagree about which one wins (msgspec and Python
    keep the last, others the first): a proxy or an authorizer in front may have read the
    other one. So the middleware picks neither."""
    mw, provider = middleware(routes=routes)
    result = await call(mw, body)
    assert result.status == 400
    error = result.json()["error"]
    assert (error["code"], error["param"]) == ("conflicting_tier", "tier")
    assert "2 times, with different values" in error["message"]
    assert provider.calls == []


@pytest.mark.parametrize(
    "body",
    [
        rb'{"tier": "simple", "tier": " Simple"}',  # the same tier once trimmed and lowercased
        rb'{"tier": "simple", "ti\u0065r": "simple"}',
        rb'{"model": "tier:simple", "model": "tier:simple", "tier": "simple"}',
    ],
)
async def test_a_member_named_twice_with_one_tier_is_routed_and_written_once(body: bytes) -> None:
    mw, provider = middleware()
    result = await call(mw, body)
    assert result.status == 200
    received = provider.calls[0]["body"]
    assert b"tier" not in received.replace(b"x-tier", b"")  # every occurrence removed
    assert received.count(b'"model"') == 1
    assert json.loads(received)["model"] in SIMPLE


@pytest.mark.parametrize(
    "body",
    [
        b'{"tier": "simple", "metadata": {"tier": "complex", "model": "tier:complex"}}',
        b'{"tier": "simple", "role": "tier", "tags": ["tier", "model"]}',
        b'{"tier": "simple", "messages": [{"content": "say \\"tier\\" and \\u0074ier"}]}',
    ],
    ids=["nested members", "the name as a value", "the name in a string, escaped"],
)
async def test_only_the_top_level_counts(body: bytes) -> None:
    mw, provider = middleware()
    result = await call(mw, body)
    assert result.status == 200
    assert result.headers["x-tier"] == "simple"
    received = json.loads(provider.calls[0]["body"])
    assert {k: v for k, v in received.items() if k != "model"} == {
        k: v for k, v in json.loads(body).items() if k != "tier"
    }


# -- nesting --------------------------------------------------------------------------------------


def nested(depth: int) -> bytes:
    return b'{"tier": "simple", "a": ' + b"[" * depth + b"]" * depth + b"}"


def echo_app(**options: Any) -> tuple[Starlette, list[bytes]]:
    received: list[bytes] = []

    async def echo(request: Request) -> Response:
        received.append(await request.body())
        return Response(b'{"ok": true}', media_type="application/json")

    app = Starlette(routes=[Route(ROUTE, echo, methods=["POST"])])
    app.add_middleware(TierRoutingMiddleware, config=two_per_tier(), **options)
    return app, received


async def test_under_uvicorn_the_parsers_stop_near_a_thousand_levels() -> None:
    """Python's recursion limit (1,000 by default) bounds both parsers, less the stack already
    in use, so the figure depends on what runs the loop: on Python 3.11 about 980 levels under a
    uvicorn started by a script, about 945 here, where pytest's frames sit below the loop."""
    import httpx

    app, received = echo_app(routes=[ROUTE])
    headers = {"content-type": "application/json"}
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:

        async def routed(depth: int) -> bool:
            response = await client.post(ROUTE, content=nested(depth), headers=headers)
            if response.status_code == 200:
                assert b"[" * depth + b"]" * depth in received[-1]  # intact, to the last level
                return True
            assert response.status_code == 400
            assert response.json()["error"] == {
                "message": "the request body is nested deeper than the JSON parser goes",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_json",
            }
            return False

        low, high = 1, 5_000  # routed, not routed
        assert await routed(low)
        assert not await routed(high)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if await routed(middle) else (low, middle)
    print(f"deepest body routed under uvicorn and Starlette: {low} levels")
    assert 900 <= low < 1_000


async def test_with_every_path_routed_a_body_too_deep_to_parse_passes_through_untouched() -> None:
    mw, provider = middleware(routes=None)
    result = await call(mw, nested(100_000))
    assert result.status == 200
    assert provider.calls[0]["body"] == nested(100_000)
    assert "x-tier" not in result.headers


# -- a body over the cap, answered before it is read ------------------------------------------------

LIMIT = 1024
DECLARED = 20_000_000


def post(port: int, *, expect: bool = False, write_body: bool = False) -> bytes | str:
    """Send the head of a POST that declares a 20 MB body (and with `write_body` the body itself,
    before reading anything, as a simple client does); returns what came back up to the close,
    or the name of the error that ended the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = (
            f"POST {ROUTE} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {DECLARED}\r\n" + ("Expect: 100-continue\r\n" if expect else "")
        )
        sock.sendall((head + "\r\n").encode())
        try:
            if write_body:
                chunk = b" " * 65536
                for _ in range(DECLARED // len(chunk)):
                    sock.sendall(chunk)
            answer = b""
            while data := sock.recv(65536):
                answer += data
            return answer  # up to the server's close: the connection is not kept
        except (ConnectionResetError, BrokenPipeError) as exc:
            return type(exc).__name__


@pytest.mark.parametrize("http", ["h11", "httptools"])
async def test_a_413_before_the_body_is_read_closes_the_connection(http: str) -> None:
    app, received = echo_app(routes=[ROUTE], limits=RequestLimits(max_body_bytes=LIMIT))
    async with serve(app, http=http) as url:
        port = int(url.rsplit(":", 1)[1])
        for expect in (True, False):  # with Expect: 100-continue the body is never sent
            answer = await anyio.to_thread.run_sync(functools.partial(post, port, expect=expect))
            assert isinstance(answer, bytes)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 413 ")
            assert b"\r\nconnection: close" in head.lower()
            assert json.loads(body)["error"]["code"] == "request_too_large"
        # A client that writes the whole body before it reads: the server has closed the
        # connection, so the kernel answers the rest of the upload with a reset, which may
        # reach the client before the 413 does. Either way it ends at once, never hangs.
        for _ in range(3):
            answer = await anyio.to_thread.run_sync(functools.partial(post, port, write_body=True))
            assert answer in ("ConnectionResetError", "BrokenPipeError") or (
                isinstance(answer, bytes) and answer.startswith(b"HTTP/1.1 413 ")
            ), answer
    assert received == []
