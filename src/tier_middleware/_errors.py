"""Errors the middleware answers itself: stable codes, one rendering (the OpenAI error shape)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec

from ._asgi import send_json
from ._types import Headers, Send


class TierError(Exception):
    """A request the middleware answers itself instead of calling the app."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        headers: Headers | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.type = type
        self.param = param
        self.headers = headers or []

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return msgspec.json.encode({"error": error})

    async def send(self, send: Send, extra_headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        await send_json(send, self.status, self.body(), (*self.headers, *extra_headers))


def bad_request(code: str, message: str, param: str | None = None) -> TierError:
    return TierError(400, code, message, param=param)


def too_deep() -> TierError:
    return bad_request(
        "invalid_json",
        "the request body is nested deeper than the JSON parser goes",
    )


def request_timeout(seconds: float) -> TierError:
    return TierError(
        408, "request_timeout", f"the request body did not arrive within {seconds:g} s"
    )


def retry_after_headers(seconds: float, bounds: tuple[int, int]) -> Headers:
    """`Retry-After` in whole seconds and `retry-after-ms`, both clamped to `bounds`.

    The Anthropic SDK ignores Retry-After above 60 s and the OpenAI SDK stops retrying above 120 s,
    so an honest but long backoff is worse for clients than a clamped one.
    """
    low, high = bounds
    if not math.isfinite(seconds):
        seconds = high
    clamped = min(max(seconds, low), high)
    return [
        (b"retry-after", str(min(max(math.ceil(seconds), low), high)).encode()),
        (b"retry-after-ms", str(math.ceil(clamped * 1000)).encode()),
    ]


def service_unavailable(
    code: str, message: str, retry_after: float, bounds: tuple[int, int]
) -> TierError:
    return TierError(
        503,
        code,
        message,
        type="service_unavailable",
        headers=retry_after_headers(retry_after, bounds),
    )
