"""A raw ASGI harness: scripted client messages in, every sent message recorded."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio

Message = dict[str, Any]
App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


@dataclass
class Result:
    messages: list[Message]

    @property
    def start(self) -> Message:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        assert len(starts) == 1, f"expected exactly one response start, got {starts}"
        return starts[0]

    @property
    def status(self) -> int:
        return int(self.start["status"])

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode().lower(): v.decode() for k, v in self.start["headers"]}

    def header_list(self, name: str) -> list[str]:
        return [v.decode() for k, v in self.start["headers"] if k.decode().lower() == name]

    @property
    def body(self) -> bytes:
        return b"".join(
            m.get("body", b"") for m in self.messages if m["type"] == "http.response.body"
        )

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Client:
    """Plays the server side for one request: hands out `chunks`, then blocks until
    `disconnect` is set (or returns http.disconnect at once with `leave=True`)."""

    chunks: list[bytes] = field(default_factory=lambda: [b""])
    leave_after_body: bool = False
    disconnect_during_body: bool = False
    received: int = 0
    disconnect: anyio.Event = field(default_factory=anyio.Event)
    sent: list[Message] = field(default_factory=list)

    async def receive(self) -> Message:
        self.received += 1
        if self.chunks:
            if self.disconnect_during_body and len(self.chunks) == 1:
                self.chunks.clear()
                return {"type": "http.disconnect"}
            chunk = self.chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks)}
        if not self.leave_after_body:
            await self.disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)


def http_scope(
    path: str = "/v1/chat/completions",
    headers: Iterable[tuple[str, str]] = (("content-type", "application/json"),),
    method: str = "POST",
) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
        "state": {},
    }


async def read_body(receive: Any) -> bytes:
    """What an ASGI app reads of a request body: every chunk up to the one without `more_body`."""
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def call(
    app: App,
    body: bytes | list[bytes] = b"",
    *,
    path: str = "/v1/chat/completions",
    headers: Iterable[tuple[str, str]] = (("content-type", "application/json"),),
    client: Client | None = None,
    scope: dict[str, Any] | None = None,
) -> Result:
    client = client or Client(chunks=[body] if isinstance(body, bytes) else list(body))
    scope = scope or http_scope(path, headers)
    with anyio.fail_after(5):
        await app(scope, client.receive, client.send)
    return Result(client.sent)


class Provider:
    """A fake LLM endpoint as a raw ASGI app: records what it receives and answers per model."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.status: dict[str, int] = {}  # model -> status to answer
        self.raise_for: set[str] = set()
        self.response_headers: list[tuple[bytes, bytes]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        chunks = []
        while True:
            message = await receive()
            assert message["type"] == "http.request", message
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        model = headers.get("x-tier-model", "")
        self.calls.append({"scope": scope, "body": body, "headers": headers, "model": model})
        if model in self.raise_for:
            raise RuntimeError(f"provider {model} exploded")
        status = self.status.get(model, 200)
        payload = json.dumps({"model": model, "ok": status < 400}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), *self.response_headers],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    @property
    def models(self) -> list[str]:
        return [c["model"] for c in self.calls]
