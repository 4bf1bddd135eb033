"""Request bodies: buffering under a cap, parsing JSON once, serialising the rewrite."""

from __future__ import annotations

import json
from typing import Any

import msgspec

from ._types import Receive

# Only the top level of a body is decoded: each member's value stays the exact bytes the client
# sent (msgspec validates them while skipping). Nothing nested is turned into Python objects, so
# the parse costs a fraction of a full one, and the app receives nested values byte for byte.
_members = msgspec.json.Decoder(dict[str, msgspec.Raw])
_decode = msgspec.json.decode
_encode = msgspec.json.Encoder().encode

# JSON strings of model names, encoded once: the set of models is the config's, so it stays small.
_string_cache: dict[str, msgspec.Raw] = {}


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
    """A JSON object body, its top-level members readable and replaceable.

    The fast form holds each member as raw JSON (`msgspec.Raw`); the stdlib form, for JSON msgspec
    refuses but Python's parser takes (NaN, lone surrogates, very deep nesting), holds decoded
    values and is written back by the stdlib too, so nothing the app would have received is lost.
    """

    __slots__ = ("members", "raw")

    def __init__(self, members: dict[str, Any], raw: bool) -> None:
        self.members = members
        self.raw = raw

    def value(self, name: str) -> Any:
        """The decoded value of a top-level member; None when absent (or JSON null)."""
        member = self.members.get(name)
        if member is None or not self.raw:
            return member
        try:
            return _decode(member)
        except RecursionError:  # valid, but nested past what the decoder goes: an array or object
            return [] if bytes(member).startswith(b"[") else {}

    def rewrite(self, drop: str, name: str, text: str) -> bytes:
        """The body without member `drop`, with member `name` set to the string `text`."""
        members = self.members
        members.pop(drop, None)
        if not self.raw:
            members[name] = text
            try:
                return json.dumps(members, separators=(",", ":")).encode()
            except RecursionError:
                raise TooDeep from None
        encoded = _string_cache.get(text)
        if encoded is None:
            encoded = msgspec.Raw(_encode(text))
            if len(_string_cache) < 4096:
                _string_cache[text] = encoded
        members[name] = encoded
        return _encode(members)


def parse_object(body: bytes) -> Payload | None:
    """The body as a JSON object, or None when it is not valid JSON or not an object."""
    try:
        members = _members.decode(body)
    except (ValueError, RecursionError):  # DecodeError, or UnicodeDecodeError from a bad key
        pass
    else:
        # Skipped strings are checked for JSON syntax but not for UTF-8; JSON text must be UTF-8.
        if body.isascii():
            return Payload(members, True)
        try:
            body.decode()
        except UnicodeDecodeError:
            return None
        return Payload(members, True)
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return Payload(data, False) if isinstance(data, dict) else None
