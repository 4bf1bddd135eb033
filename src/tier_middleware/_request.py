"""What the client sent: the headers the middleware reads, the body it holds back so that a
failed call can be replayed to the app, and the tier the request names (body field, header, or
`model: "tier:<name>"`)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from ._asgi import by_name, close_unread, content_length, is_json
from ._errors import (
    RequestError,
    conflicting_tier,
    invalid_tier,
    not_an_object,
    request_timeout,
    tier_required,
    too_deep,
    too_large,
)
from ._payload import Payload, TooDeep, parse_object, repeated
from ._routes import RoutePolicy
from ._types import Headers, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from ._middleware import TierRoutingMiddleware

OWN_HEADERS = frozenset({b"x-tier", b"x-tier-provider", b"x-tier-model", b"x-tier-attempts"})
BODY_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_DISCONNECT: Message = {"type": "http.disconnect"}


class Request:
    """One request as the client sent it; `_Exchange` routes it."""

    # What most requests never change is a class default, set on an instance only when it
    # changes: a routed request then costs five attribute writes to build, not fourteen.
    buffered: list[bytes] | None = None  # what was read from `receive`, None if nothing
    complete = True  # whether `buffered` is the whole body
    body = b""  # the whole body as the client sent it, when held
    payload: Payload | None = None  # set when the body is rewritten
    disconnected = False
    # The request headers by name, when every name is lowercase and appears once (what servers
    # send); None otherwise, and the headers are then read one by one.
    named: dict[bytes, bytes] | None = None
    session_raw: bytes | None = None

    def __init__(
        self,
        mw: TierRoutingMiddleware,
        scope: Scope,
        receive: Receive,
        send: Send,
        policy: RoutePolicy,
    ) -> None:
        self.mw = mw
        self.scope = scope
        self.receive = receive
        self.send = send
        self.policy = policy
        self.headers: Headers = scope["headers"]

    def scan_headers(self, found: list[tuple[str, str]]) -> tuple[bytes | None, bytes | None, bool]:
        """(content-type, content-length, chunked) of the request; a tier header goes into
        `found`, the session header into `session_raw`."""
        mw = self.mw
        headers = self.headers
        named = self.named = by_name(headers)
        if named is not None:
            tier_raw = named.get(mw.tier_header)
            if tier_raw is not None:
                found.append(("header", header_tier(tier_raw)))
            if mw.session_header is not None:
                self.session_raw = named.get(mw.session_header)
            return (
                named.get(b"content-type"),
                named.get(b"content-length"),
                b"transfer-encoding" in named,
            )
        content_type = length = None
        chunked = False
        for raw_name, value in headers:
            name = raw_name.lower()
            if name == mw.tier_header:
                found.append(("header", header_tier(value)))
            elif name == b"content-type":
                content_type = value
            elif name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = True
            elif name == mw.session_header:
                self.session_raw = value
        return content_type, length, chunked

    async def read_tier(self) -> str | None:
        """The tier the request names (normalised, not yet checked against the config), the
        route's default, or None for a request that is not ours."""
        mw = self.mw
        found: list[tuple[str, str]] = []
        content_type, length, chunked = self.scan_headers(found)
        # An explicitly opted-in route is a JSON LLM endpoint: bad bodies are rejected. With
        # routes=None only a request that names a tier is ours; anything else goes on untouched.
        strict = mw.routes.explicit or bool(found)
        declared = content_length(length)
        if content_type is not None and (
            content_type == b"application/json" or is_json(content_type)
        ):
            if declared is not None and declared > mw.max_body_bytes:
                if strict:
                    raise too_large(mw.max_body_bytes)
                return None
            await self.hold(strict)
            if not self.complete:
                return None
            if self.body:
                try:
                    payload = parse_object(self.body)
                    if payload is not None:
                        found += body_tiers(payload, self.body, mw.tier_field, mw.model_field)
                except TooDeep:
                    if strict:
                        raise too_deep() from None
                    return None
                if payload is None:
                    if strict:
                        raise not_an_object()
                    return None
                self.payload = payload
        elif not strict:
            return None
        elif (declared is not None and declared <= mw.max_body_bytes) or (
            declared is None and not chunked
        ):
            # Not JSON but small enough to hold: keep it so a failed call can be replayed.
            await self.hold(strict)
        tier = found[0][1] if len(found) == 1 else agree(found)
        if tier is None:
            tier = self.policy.default_tier
            if tier is None and self.policy.require_tier:
                raise tier_required()
        return tier

    async def hold(self, strict: bool) -> None:
        """Read the body and hold it, all of it within `body_timeout` when one is set (else 408,
        and the app is not called)."""
        deadlines = self.mw.body_deadlines
        if deadlines is None:  # the default: no deadline to keep
            first = await self.receive()
            if not self.hold_whole(first, strict):
                await self.buffer(first, strict)
            return
        deadline = deadlines.start()  # None outside asyncio (trio): no deadline then
        try:
            first = await self.receive()
            if not self.hold_whole(first, strict):
                await self.buffer(first, strict)
        except BaseException:
            if deadline is None or not deadline.absorb():
                raise
            self.complete = False
            raise request_timeout(self.mw.body_timeout or 0.0) from None
        finally:
            if deadline is not None:
                deadline.settle()

    def hold_whole(self, first: Message, strict: bool) -> bool:
        """Hold a body that came whole in its first message (the common case, with no await);
        False when more is to come and `_buffer` must read it."""
        if first["type"] != "http.request" or first.get("more_body", False):
            return False
        body = first.get("body", b"")
        self.buffered = [body]
        if len(body) > self.mw.max_body_bytes:
            if strict:
                raise too_large(self.mw.max_body_bytes)
        else:
            self.body = body
        return True

    async def buffer(self, first: Message, strict: bool) -> None:
        """Hold the body whose first message is `first` and that goes on, up to the cap."""
        limit = self.mw.max_body_bytes
        if first["type"] == "http.disconnect":
            self.disconnected = True
        try:
            self.body = await read_body(self.then_live(first), limit)
        except BodyTooLarge as exc:
            if strict:
                raise too_large(limit) from None
            self.buffered = exc.chunks
            self.complete = exc.complete
            return
        self.buffered = [self.body]

    def close_after(self) -> Headers:
        """For an answer of the middleware's own: `Connection: close` if the body was not read
        to its end (see `close_unread`)."""
        return close_unread(self.scope, self.complete and self.buffered is not None)

    async def receive_live(self) -> Message:
        # The server sends http.disconnect once; every later caller must see it too.
        if self.disconnected:
            return _DISCONNECT
        message = await self.receive()
        if message["type"] == "http.disconnect":
            self.disconnected = True
        return message

    def replaying(self) -> Receive:
        """`receive` for an unrouted request: what was read first, then the live stream."""
        if self.buffered is None:
            return self.receive
        body = b"".join(self.buffered)
        return self.then_live(
            {"type": "http.request", "body": body, "more_body": not self.complete}
        )

    def then_live(self, message: Message) -> Receive:
        """A `receive` that hands out `message` once, then the live stream."""
        pending = [message]

        async def receive() -> Message:
            return pending.pop() if pending else await self.receive_live()

        return receive

    # -- choosing and calling -----------------------------------------------------------------


# -- the body ------------------------------------------------------------------------------------


class BodyTooLarge(Exception):
    """The body went past the cap; `chunks` holds what was read so it can still be replayed."""

    def __init__(self, chunks: list[bytes], complete: bool) -> None:
        super().__init__("request body too large")
        self.chunks = chunks
        self.complete = complete  # the chunk that crossed the cap was also the last one


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


# -- the tier ------------------------------------------------------------------------------------

MAX_TIER_LENGTH = 64
MODEL_PREFIX = "tier:"


def _shown(value: str) -> str:
    return value if len(value) <= 40 else value[:40] + "..."


def clean_tier(value: Any, source: str) -> str:
    """Normalise one tier value (trim, lowercase) or raise 400 `invalid_tier`."""
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise invalid_tier(f"the tier in {source} must be a string, got {kind}")
    if len(value) > MAX_TIER_LENGTH * 4:  # bound the work before stripping a huge string
        raise invalid_tier(f"the tier in {source} is longer than {MAX_TIER_LENGTH} characters")
    tier = value.strip().lower()
    if not tier:
        raise invalid_tier(f"the tier in {source} is empty")
    if len(tier) > MAX_TIER_LENGTH:
        raise invalid_tier(f"the tier in {source} is longer than {MAX_TIER_LENGTH} characters")
    return tier


def tier_from_model(model: Any) -> str | None:
    """The tier named by `"model": "tier:<name>"`, or None for an ordinary model value."""
    if isinstance(model, str) and model[:5].lower() == MODEL_PREFIX:
        return clean_tier(model[5:], "model 'tier:<name>'")
    return None


def header_tier(raw: bytes) -> str:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise invalid_tier("the tier header must be ASCII") from None
    if not text.isprintable():
        raise invalid_tier("the tier header contains control characters")
    return clean_tier(text, "header")


def agree(found: list[tuple[str, str]]) -> str | None:
    """One tier from all sources that named one, or 400 `conflicting_tier` when they differ."""
    if not found:
        return None
    tier = found[0][1]
    for source, other in found[1:]:
        if other != tier:
            first = found[0][0]
            raise conflicting_tier(
                f"the tier in {first} ({_shown(tier)!r}) and in {source} ({_shown(other)!r}) differ"
            )
    return tier


def body_tiers(
    payload: Payload, body: bytes, tier_field: str, model_field: str
) -> list[tuple[str, str]]:
    """(source, tier) for the tier field and a `tier:` model of the body. A member named more
    than once at the top level counts once per occurrence (`conflicting_tier` if they differ):
    parsers disagree on which one wins, so the middleware does not pick one for the client."""
    found: list[tuple[str, str]] = []
    members = payload.members
    if tier_field not in members and model_field not in members:
        return found  # the tier is in a header, or the request names none
    # A body written compactly with nothing left over names no member twice: most bodies (the
    # SDKs write compact JSON) need no search for a second one.
    compact = payload.compact(body)
    if tier_field in members:
        values = None if compact else repeated(body, tier_field)
        source = _field_source(tier_field)
        if values is None:
            found.append((source, _member_tier(payload, tier_field)))
        else:
            tiers = {clean_tier(value, "body") for value in values}
            if len(tiers) > 1:
                raise _twice(tier_field, values)
            found.append((source, tiers.pop()))
    if model_field not in members:
        return found
    values = None if compact else repeated(body, model_field)
    if values is not None:
        named = [tier_from_model(value) for value in values]
        if any(t is not None for t in named) and len({repr(v) for v in values}) > 1:
            raise _twice(model_field, values)
        model_tier = named[0]
    else:
        model_tier = tier_from_model(payload.value(model_field))
    if model_tier is not None:
        found.append(("model", model_tier))
    return found


@functools.cache
def _field_source(field: str) -> str:
    return "body field '" + field + "'"


# Tier members as sent (`"simple"`, JSON-encoded) -> the tier they name: a few distinct values
# make nearly all traffic, and each is decoded and normalised once.
_known_tiers: dict[bytes, str] = {}


def _member_tier(payload: Payload, name: str) -> str:
    if not payload.raw:
        return clean_tier(payload.value(name), "body")
    sent = bytes(payload.members[name])
    tier = _known_tiers.get(sent)
    if tier is None:
        tier = clean_tier(payload.value(name), "body")  # raises for what is not a tier
        if len(_known_tiers) < 1024 and len(sent) <= 2 * MAX_TIER_LENGTH:
            _known_tiers[sent] = tier
    return tier


def _twice(field: str, values: list[Any]) -> RequestError:
    shown = ", ".join(repr(_shown(v) if isinstance(v, str) else v)[:60] for v in values[:3])
    return conflicting_tier(
        f"the body names {field!r} {len(values)} times, with different values ({shown})"
    )
