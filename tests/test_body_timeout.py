"""`body_timeout`: a routed request whose body has not fully arrived in time is answered
`408 request_timeout` and the app is not called.

The deadline covers the whole body the middleware reads, not each read, so a client that trickles
a byte at a time cannot stretch it. The timeout is real time by nature (it bounds how long a
connection is held), so these tests wait for it, with short timeouts and deadlines around them.
"""

from __future__ import annotations

import functools
import json
import math
import socket
import time
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_harness import Message, Provider, Result, http_scope
from configs import two_per_tier
from servers import serve
from tier_middleware import RequestLimits, TierRoutingMiddleware

pytestmark = pytest.mark.anyio

ROUTE = "/v1/chat/completions"
BODY = json.dumps({"tier": "simple", "messages": [{"role": "user", "content": "hi"}]}).encode()
TIMEOUT = 0.3


class Trickle:
    """A client that sends `chunks`, one every `gap` seconds, then stalls (or ends the body)."""

    def __init__(self, chunks: list[bytes], gap: float = 0.0, *, stall: bool = True) -> None:
        self.chunks = list(chunks)
        self.gap = gap
        self.stall = stall
        self.sent: list[Message] = []
        self.gone = anyio.Event()

    async def receive(self) -> Message:
        if self.chunks:
            if self.gap:
                await anyio.sleep(self.gap)  # the client's pace on the wire
            chunk = self.chunks.pop(0)
            more = bool(self.chunks) or self.stall
            return {"type": "http.request", "body": chunk, "more_body": more}
        await self.gone.wait()  # stalled: nothing more, ever (the test's deadline ends it)
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)


def middleware(app: Any, **options: Any) -> TierRoutingMiddleware:
    options.setdefault("routes", [ROUTE])
    return TierRoutingMiddleware(app, config=two_per_tier(), **options)


async def drive(mw: Any, client: Trickle, content_type: str = "application/json") -> Result:
    headers = [("content-type", content_type), ("content-length", str(len(BODY)))]
    scope = http_scope(ROUTE, headers)
    with anyio.fail_after(5):
        await mw(scope, client.receive, client.send)
    return Result(client.sent)


def assert_timed_out(result: Result) -> None:
    assert result.status == 408
    assert result.json() == {
        "error": {
            "message": f"the request body did not arrive within {TIMEOUT:g} s",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_timeout",
        }
    }
    assert result.headers["connection"] == "close"


@pytest.mark.parametrize(
    "chunks",
    [[], [BODY[:10]]],
    ids=["nothing after the headers", "part of the body"],
)
async def test_a_stalled_body_is_a_408_and_the_app_is_not_called(chunks: list[bytes]) -> None:
    provider = Provider()
    started = time.monotonic()
    result = await drive(
        middleware(provider, limits=RequestLimits(body_timeout=TIMEOUT)), Trickle(chunks)
    )
    assert_timed_out(result)
    assert TIMEOUT <= time.monotonic() - started < TIMEOUT + 0.5
    assert provider.calls == []


async def test_the_deadline_covers_the_whole_body_not_each_read() -> None:
    """A byte every 50 ms never waits long, and still takes longer than the timeout."""
    provider = Provider()
    client = Trickle([BODY[i : i + 1] for i in range(len(BODY))], gap=0.05, stall=False)
    assert_timed_out(
        await drive(middleware(provider, limits=RequestLimits(body_timeout=TIMEOUT)), client)
    )
    assert provider.calls == []


async def test_a_body_in_time_is_routed() -> None:
    provider = Provider()
    client = Trickle([BODY[:20], BODY[20:40], BODY[40:]], gap=0.02, stall=False)
    result = await drive(middleware(provider, limits=RequestLimits(body_timeout=TIMEOUT)), client)
    assert result.status == 200
    assert json.loads(provider.calls[0]["body"])["model"] in {"mini", "haiku"}


async def test_a_small_non_json_body_the_middleware_holds_is_bounded_too() -> None:
    provider = Provider()
    mw = middleware(provider, limits=RequestLimits(body_timeout=TIMEOUT))
    headers = [("content-type", "audio/wav"), ("content-length", "100"), ("x-tier", "simple")]
    scope = http_scope(ROUTE, headers)
    client = Trickle([b"RIFF"])
    with anyio.fail_after(5):
        await mw(scope, client.receive, client.send)
    assert_timed_out(Result(client.sent))
    assert provider.calls == []


async def test_with_every_path_routed_a_json_body_the_middleware_reads_is_bounded() -> None:
    provider = Provider()
    mw = middleware(provider, routes=None, limits=RequestLimits(body_timeout=TIMEOUT))
    assert_timed_out(await drive(mw, Trickle([BODY[:10]])))
    assert provider.calls == []


async def test_without_body_timeout_the_middleware_waits_for_the_body() -> None:
    provider = Provider()
    mw = middleware(provider)
    client = Trickle([BODY[:10]])
    scope = http_scope(ROUTE, [("content-type", "application/json")])
    with anyio.move_on_after(2 * TIMEOUT) as waited:
        await mw(scope, client.receive, client.send)
    assert waited.cancelled_caught  # still waiting for the body when the test gave up
    assert client.sent == []


@pytest.mark.parametrize(
    "value", [0, -1, 0.0, math.inf, -math.inf, math.nan], ids=lambda v: repr(v)
)
def test_body_timeout_must_be_positive_and_finite(value: float) -> None:
    with pytest.raises(ValueError, match="body_timeout must be a positive, finite number"):
        middleware(Provider(), limits=RequestLimits(body_timeout=value))


@pytest.mark.parametrize("value", [True, "5", [1]], ids=repr)
def test_body_timeout_must_be_a_number(value: Any) -> None:
    with pytest.raises(TypeError, match="body_timeout must be a number of seconds or None"):
        middleware(Provider(), limits=RequestLimits(body_timeout=value))


@pytest.mark.parametrize("value", [None, 1, 0.25, 30.0])
def test_body_timeout_accepts_none_and_positive_numbers(value: float | None) -> None:
    mw = middleware(Provider(), limits=RequestLimits(body_timeout=value))
    assert mw.body_timeout == (None if value is None else float(value))


# -- on a real server ------------------------------------------------------------------------------


def starlette_app(calls: list[str]) -> Starlette:
    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        calls.append(body["model"])
        return JSONResponse({"model": body["model"]})

    app = Starlette(routes=[Route(ROUTE, chat, methods=["POST"])])
    app.add_middleware(
        TierRoutingMiddleware,
        config=two_per_tier(),
        routes=[ROUTE],
        limits=RequestLimits(body_timeout=TIMEOUT),
    )
    return app


def raw_request(
    port: int, body_part: bytes, declared: int, *, closes: bool = False
) -> tuple[bytes, bytes, float, bool]:
    """Send the headers and part of the body, then stall; returns (the answer's head, its body,
    seconds until it came, and with `closes` whether the server then closed the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        head = (
            f"POST {ROUTE} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared}\r\n\r\n"
        ).encode()
        sock.sendall(head + body_part)
        started = time.monotonic()
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        head, _, body = answer.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            body += sock.recv(65536)
        elapsed = time.monotonic() - started
        if not closes:
            return head, body, elapsed, False
        sock.settimeout(2.0)
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False  # kept alive
        return head, body, elapsed, closed


@pytest.mark.parametrize("http", ["h11", "httptools"])
async def test_under_uvicorn_a_stalled_body_gets_a_408_and_the_connection_closes(
    http: str,
) -> None:
    calls: list[str] = []
    async with serve(starlette_app(calls), http=http) as url:
        port = int(url.rsplit(":", 1)[1])
        head, body, elapsed, closed = await anyio.to_thread.run_sync(
            functools.partial(raw_request, port, BODY[:10], len(BODY), closes=True)
        )
        assert head.startswith(b"HTTP/1.1 408 ")
        assert json.loads(body)["error"]["code"] == "request_timeout"
        assert TIMEOUT <= elapsed < TIMEOUT + 1.0
        assert closed
        # A whole body on a new connection is served as usual.
        head, body, _, _ = await anyio.to_thread.run_sync(raw_request, port, BODY, len(BODY))
        assert head.startswith(b"HTTP/1.1 200 ")
    assert len(calls) == 1  # only the complete request reached the app
