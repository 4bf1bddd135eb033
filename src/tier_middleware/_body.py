"""Request bodies: buffering under a cap, parsing JSON once, serialising the rewrite."""

from __future__ import annotations

import json
from typing import Any

import orjson

from ._types import Message, Receive


class BodyTooLarge(Exception):
    """The body went past the cap; `chunks` holds what was read so it can still be replayed."""

    def __init__(self, chunks: list[bytes], complete: bool) -> None:
        super().__init__("request body too large")
        self.chunks = chunks
        self.complete = complete  # the chunk that crossed the cap was also the last one


class TooDeep(Exception):
    """A JSON body nested too deeply to be written back."""


class ClientGone(Exception):
    """The client disconnected before the body was complete."""


async def read_body(receive: Receive, limit: int) -> bytes:
    """Read the whole body; BodyTooLarge past `limit` bytes, ClientGone on disconnect."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(chunks, complete=not message.get("more_body", False))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class Payload:
    """A parsed JSON object that is serialised back the way it was read.

    orjson covers nearly every body; the stdlib parser takes what orjson refuses but JSON allows in
    practice (integers past 64 bits, NaN, lone surrogates), and then also writes the result, so
    nothing the app would have received is altered.
    """

    __slots__ = ("data", "stdlib")

    def __init__(self, data: dict[str, Any], stdlib: bool) -> None:
        self.data = data
        self.stdlib = stdlib

    def dumps(self) -> bytes:
        """The object as JSON; TooDeep when it nests deeper than any serialiser here goes."""
        if not self.stdlib:
            try:
                return orjson.dumps(self.data)
            except (TypeError, orjson.JSONEncodeError):  # orjson writes only 254 levels deep
                pass
        try:
            return json.dumps(self.data, separators=(",", ":")).encode()
        except RecursionError:
            raise TooDeep from None


def parse_object(body: bytes) -> Payload | None:
    """The body as a JSON object, or None when it is not valid JSON or not an object."""
    stdlib = False
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            return None
        stdlib = True
    return Payload(data, stdlib) if isinstance(data, dict) else None


def replay(body: bytes) -> Message:
    return {"type": "http.request", "body": body, "more_body": False}
