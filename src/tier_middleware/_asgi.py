"""The ASGI plumbing the package shares: header access, the one JSON response writer, and what
the package's own small apps do with scopes that are not HTTP."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._types import ASGIApp, Headers, Receive, Scope, Send

_JSON = (b"content-type", b"application/json")


async def send_json(
    send: Send,
    status: int,
    body: bytes,
    headers: Iterable[tuple[bytes, bytes]] = (),
    *,
    head: bool = False,
) -> None:
    """A whole JSON response: `body` is encoded JSON; a HEAD request gets the headers only."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [_JSON, (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": b"" if head else body})


def by_name(headers: Any) -> dict[bytes, bytes] | None:
    """ASGI headers as a dict when every name is lowercase bytes and appears once (what servers
    and frameworks send), so the common case needs no Python loop; None otherwise."""
    if type(headers) is not list and type(headers) is not tuple:
        return None
    try:
        named = dict(headers)
        if len(named) == len(headers) and b"".join(named).islower():
            return named
    except (TypeError, ValueError):
        pass
    return None


def close_unread(scope: Scope, whole: bool) -> Headers:
    """`Connection: close` on HTTP/1 for an answer sent before the request body was read to its
    end (`whole`: it was): the rest may still be on its way, the connection cannot carry another
    request, and a server left to read it (uvicorn's h11) would stall the client. HTTP/2 and 3
    end a stream, not the connection, and forbid the header."""
    if whole or scope.get("http_version", "1.1") not in ("1.1", "1.0"):
        return []
    return [(b"connection", b"close")] if declares_body(scope["headers"]) else []


def declares_body(headers: Headers) -> bool:
    """Whether the request headers announce a body (a non-zero length, or chunked)."""
    for raw_name, value in headers:
        name = raw_name.lower()
        if name == b"transfer-encoding":
            return True
        if name == b"content-length" and content_length(value) != 0:
            return True
    return False


def content_length(value: bytes | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


class SmallApp:
    """One of the package's small apps (metrics, status): `http` answers HTTP, the rest is
    `other_scope`. An object rather than a function, because Starlette's `add_route` calls a
    function as `endpoint(request)` and only an object as an ASGI app."""

    __slots__ = ("http",)

    def __init__(self, http: ASGIApp) -> None:
        self.http = http

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        else:
            await other_scope(scope["type"], receive, send)


async def other_scope(kind: str, receive: Receive, send: Send) -> None:
    """What the package's own small apps (metrics, status) do with a scope that is not HTTP:
    acknowledge lifespan events, close websockets."""
    if kind == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    elif kind == "websocket":
        await send({"type": "websocket.close", "code": 1000})
