"""ASGI type aliases, kept here so that the package imports no framework's types at runtime."""

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

# `authorize=`: whether the caller of a request may use a tier (async, or sync: run in a thread).
Authorize = Callable[[Scope, str], bool | Awaitable[bool]]
