"""A JSON request body: parsed once (its top level only), read, and written back rewritten."""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import msgspec

# Only the top level of a body is decoded: each member's value stays the exact bytes the client
# sent (msgspec validates them while skipping). Nothing nested is turned into Python objects, so
# the parse costs a fraction of a full one, and the app receives nested values byte for byte.
_members = msgspec.json.Decoder(dict[str, msgspec.Raw])
_decode = msgspec.json.decode
_encode = msgspec.json.Encoder().encode

# JSON strings of model names, encoded once: the set of models is the config's, so it stays small.
_string_cache: dict[str, msgspec.Raw] = {}


class TooDeep(Exception):
    """A JSON body nested too deeply to be written back."""


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

    def compact(self, body: bytes) -> bool:
        """Whether `body` is exactly its members written compactly (what the OpenAI and
        Anthropic SDKs and httpx send): no whitespace between them, no key escaped, and so no
        member named twice, for a second one would take bytes the members do not account for.
        Only lengths are added: `{`, then per member its quoted key, `:`, the value as sent and a
        comma (one fewer), then `}`. A key's characters are at most its bytes, so anything
        else (a non-ASCII key too) only makes the sum fall short, never match."""
        members = self.members
        if not self.raw or not members:
            return False
        n = len(members)
        return len(body) == 1 + 4 * n + sum(map(len, members)) + sum(map(len, members.values()))

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
    """The body as a JSON object, or None when it is not valid JSON or not an object; TooDeep
    when it is nested deeper than the parsers go (Python's recursion limit, less the stack in
    use: the standard library stops a few levels before msgspec, so it is not tried then)."""
    try:
        members = _members.decode(body)
    except RecursionError:
        raise TooDeep from None
    except ValueError:  # DecodeError, or UnicodeDecodeError from a bad key
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
    except ValueError:
        return None
    except RecursionError:
        raise TooDeep from None
    return Payload(data, False) if isinstance(data, dict) else None


def repeated(body: bytes, name: str) -> list[Any] | None:
    """Every top-level value of member `name`, in order, when the body names it more than once
    (JSON allows it; both parsers keep only the last); None when it names it at most once.

    Costs a reverse search or two in the common case: only a body with `"name"` twice, or with
    a `\\u` escape that could spell one of its characters, is parsed again, pair by pair.
    """
    quoted = _quoted(name)
    last = body.rfind(quoted)
    if not (last > 0 and body.rfind(quoted, 0, last) >= 0) and (
        body.find(b"\\") < 0 or not _may_spell(body, name)  # a memchr for most bodies
    ):
        return None
    top: list[list[tuple[str, Any]]] = []

    def pairs(members: list[tuple[str, Any]]) -> dict[str, Any]:
        top[:] = [members]  # called for each object, innermost first: the last is the body
        return dict(members)

    try:
        json.loads(body, object_pairs_hook=pairs)
    except RecursionError:
        raise TooDeep from None
    except ValueError:
        return None
    values = [value for key, value in (top[0] if top else ()) if key == name]
    return values if len(values) > 1 else None


def _may_spell(body: bytes, name: str) -> bool:
    """Whether some key of the body could be `name` spelled with `\\u` escapes."""
    return _spelled(name).search(body) is not None


@functools.cache
def _quoted(name: str) -> bytes:
    return json.dumps(name, ensure_ascii=False).encode()


@functools.cache
def _spelled(name: str) -> re.Pattern[bytes]:
    """The `\\u` escapes of the characters of `name` (UTF-16 code units, hex digits in either
    case). No IGNORECASE: with the literal `\\u` in front, the regex engine scans for it fast,
    a search of a 4 KB body costing less than one `rfind` of it."""
    units = name.encode("utf-16-be")
    codes = sorted({b"%02x%02x" % (units[i], units[i + 1]) for i in range(0, len(units), 2)})
    return re.compile(rb"\\u(?:" + b"|".join(_either_case(code) for code in codes) + b")")


def _either_case(hex_digits: bytes) -> bytes:
    return b"".join(
        b"[%c%c]" % (c, c - 32) if 0x61 <= c <= 0x66 else bytes([c]) for c in hex_digits
    )
