"""ASGI type aliases (kept here so the package imports no framework's types at runtime), and
the bits of ASGI plumbing the package's small apps share."""

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]


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
