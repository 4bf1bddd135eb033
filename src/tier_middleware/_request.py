"""What the client sent: the headers the middleware reads, the body it holds back so that a
failed call can be replayed to the app, and the tier the request names."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._asgi import by_name, close_unread, content_length, is_json
from ._body import BodyTooLarge, Payload, TooDeep, parse_object, read_body
from ._errors import TierError, bad_request, request_timeout, too_deep
from ._extract import agree, body_tiers, header_tier
from ._routes import RoutePolicy
from ._types import Headers, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from ._middleware import TierRoutingMiddleware

OWN_HEADERS = frozenset({b"x-tier", b"x-tier-provider", b"x-tier-model", b"x-tier-attempts"})
BODY_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_DISCONNECT: Message = {"type": "http.disconnect"}


class Request:
    """One request as the client sent it; `_Exchange` routes it."""

    __slots__ = (
        "body",
        "buffered",
        "complete",
        "disconnected",
        "headers",
        "mw",
        "named",
        "payload",
        "policy",
        "receive",
        "scope",
        "send",
        "session_raw",
    )

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
        self.buffered: list[bytes] | None = None  # what was read from `receive`, None if nothing
        self.complete = True  # whether `buffered` is the whole body
        self.body = b""  # the whole body as the client sent it, when held
        self.payload: Payload | None = None  # set when the body is rewritten
        self.disconnected = False
        self.headers: Headers = scope["headers"]
        # The request headers by name, when every name is lowercase and appears once (what
        # servers send); None otherwise, and the headers are then read one by one.
        self.named: dict[bytes, bytes] | None = None
        self.session_raw: bytes | None = None

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
        if content_type is not None and is_json(content_type):
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
                        raise bad_request("invalid_json", "the request body must be a JSON object")
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
                raise bad_request("tier_required", "this route requires a tier", param="tier")
        return tier

    async def hold(self, strict: bool) -> None:
        """Read the body and hold it, all of it within `body_timeout` when one is set (else 408,
        and the app is not called)."""
        deadlines = self.mw.body_deadlines
        deadline = deadlines.start() if deadlines is not None else None
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


def too_large(limit: int) -> TierError:
    return TierError(
        413, "request_too_large", f"the request body exceeds the limit of {limit} bytes"
    )
