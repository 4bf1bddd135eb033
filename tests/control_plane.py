"""A real control plane for tests: a tiny HTTP/1.1 server on a loopback port, in the test's loop.

It counts its hits, records each request's headers and can be switched between behaviours:

    ok              200, the `{"success": true, "data": {...}}` envelope around `payload`
    bare            200, `payload` without the envelope
    html            200 text/html (a proxy's login page, a maintenance page)
    error500        500 with a JSON error body
    truncated       Content-Length promises more bytes than are sent, then the connection closes
    truncated_json  a well-framed HTTP response whose JSON body is cut short
    failure         200 with `{"success": false, "error": ...}`
    empty_tiers     a valid envelope whose config has no tiers
    zero_cost       a valid envelope whose config has a model with relativeCost 0
    slow            `ok`, after `delay` seconds

`await stop()` takes it down (connections refused on its port); `await start()` brings it back
on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from dataclasses import dataclass
from typing import Any

CONFIG_PATH = "/api/v1/tiers/config"
BEHAVIOURS = (
    "ok",
    "bare",
    "html",
    "error500",
    "truncated",
    "truncated_json",
    "bad_utf8",
    "failure",
    "empty_tiers",
    "zero_cost",
    "slow",
)


def tier_payload(version: str = "1", simple_model: str = "gpt-4o-mini") -> dict[str, Any]:
    """A control-plane config in its own (camelCase) vocabulary."""
    return {
        "version": version,
        "updatedAt": "2024-06-01T12:00:00Z",
        "tiers": {
            "simple": [
                {
                    "provider": "openai",
                    "model": simple_model,
                    "relativeCost": 1,
                    "inputPricePerMillion": 0.15,
                    "outputPricePerMillion": 0.6,
                },
                {"provider": "google", "model": "gemini-flash", "relativeCost": 2},
            ],
            "moderate": [{"provider": "openai", "model": "gpt-4o", "relativeCost": 5}],
            "complex": [{"provider": "anthropic", "model": "claude-opus", "relativeCost": 20}],
        },
    }


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names


class ControlPlane:
    def __init__(self, payload: dict[str, Any] | None = None) -> None:
        self.payload = payload if payload is not None else tier_payload()
        self.behaviour = "ok"
        self.delay = 5.0  # for "slow"
        self.requests: list[Request] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    @property
    def hits(self) -> int:
        return len(self.requests)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{CONFIG_PATH}"

    def serve(self, version: str, **kwargs: Any) -> None:
        """Answer with a valid config of this version from now on."""
        self.payload = tier_payload(version, **kwargs)
        self.behaviour = "ok"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        if handlers:
            await asyncio.wait(handlers)

    async def __aenter__(self) -> ControlPlane:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the server ------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *lines = head.decode("latin-1").split("\r\n")
            method, path, _ = request_line.split(" ", 2)
            headers = {}
            for line in lines:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            self.requests.append(Request(method, path, headers))
            writer.write(await self._response(method, path))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _response(self, method: str, path: str) -> bytes:
        if method != "GET" or path != CONFIG_PATH:
            return http_response(404, b'{"success": false, "error": "not found"}')
        behaviour = self.behaviour
        if behaviour == "slow":
            await asyncio.sleep(self.delay)
        data = copy.deepcopy(self.payload)
        if behaviour == "bare":
            return http_response(200, json.dumps(data).encode())
        if behaviour == "html":
            page = b"<!doctype html><html><body><h1>Please sign in</h1></body></html>"
            return http_response(200, page, "text/html; charset=utf-8")
        if behaviour == "error500":
            return http_response(500, b'{"success": false, "error": "internal error"}')
        if behaviour == "failure":
            return http_response(
                200, b'{"success": false, "error": "tier table is being migrated"}'
            )
        if behaviour == "empty_tiers":
            data["tiers"] = {}
        elif behaviour == "zero_cost":
            data["tiers"]["simple"][0]["relativeCost"] = 0
        body = json.dumps({"success": True, "data": data}).encode()
        if behaviour == "truncated":
            return http_response(200, body, length=len(body))[: -len(body) // 2]
        if behaviour == "truncated_json":
            return http_response(200, body[: len(body) // 2])
        if behaviour == "bad_utf8":  # well-formed JSON but for one key that is not UTF-8
            return http_response(200, body.replace(b'"success"', b'"succ\xffess"', 1))
        return http_response(200, body)


def http_response(
    status: int, body: bytes, content_type: str = "application/json", length: int | None = None
) -> bytes:
    reason = {200: "OK", 404: "Not Found", 500: "Internal Server Error"}[status]
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body
