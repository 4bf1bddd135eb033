"""TierRoutingMiddleware: read the tier, pick a model, rewrite the call, watch how it went."""

from __future__ import annotations

import email.utils
import logging
import math
import os
import random
import time
from collections.abc import Collection, Mapping
from contextvars import ContextVar
from typing import Any

from ._body import BodyTooLarge, ClientGone, Payload, parse_object, read_body
from ._config import TierConfig
from ._errors import TierError, bad_request, service_unavailable
from ._extract import agree, body_tiers, header_tier, invalid_tier
from ._health import HealthConfig, HealthTracker, Key
from ._router import NoHealthyModel, Selection, TierRouter
from ._routes import RoutePolicy, Routes, RouteTable
from ._types import ASGIApp, Headers, Message, Receive, Scope, Send

logger = logging.getLogger("tier_middleware")

DEFAULT_FAILURE_STATUSES = frozenset({429, 500, 502, 503, 504})
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
_OWN_HEADERS = frozenset({b"x-tier", b"x-tier-provider", b"x-tier-model", b"x-tier-attempts"})
_BODY_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_DISCONNECT: Message = {"type": "http.disconnect"}

_current: ContextVar[Selection | None] = ContextVar("tier_selection", default=None)


def current_selection() -> Selection | None:
    """The model chosen for the request being handled, inside the app; None elsewhere."""
    return _current.get()


class TierRoutingMiddleware:
    """Pure ASGI middleware that routes requests asking for a tier to a concrete model.

    Starlette / FastAPI: ``app.add_middleware(TierRoutingMiddleware, config="tiers.toml",
    routes=["/v1/chat/completions"])``. Django and any other ASGI 3 app:
    ``application = TierRoutingMiddleware(get_asgi_application(), config=..., routes=...)``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        config: TierConfig | Mapping[str, Any] | str | os.PathLike[str],
        routes: Routes = None,
        health: HealthConfig | HealthTracker | None = None,
        tier_field: str = "tier",
        tier_header: str = "x-tier",
        model_field: str = "model",
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        failure_statuses: Collection[int] = DEFAULT_FAILURE_STATUSES,
        retry_after_bounds: tuple[int, int] = (1, 60),
        rng: random.Random | None = None,
    ) -> None:
        self.app = app
        self.config = TierConfig.load(config)
        self.routes = RouteTable(routes)
        for policy in self.routes.policies():
            policy.check_against(self.config)
        tracker = health if isinstance(health, HealthTracker) else HealthTracker(health, rng=rng)
        self.router = TierRouter(self.config, tracker, rng=rng)
        self.health = tracker
        if not tier_field or not model_field:
            raise ValueError("tier_field and model_field must be non-empty")
        self.tier_field = tier_field
        self.model_field = model_field
        self.tier_header = tier_header.lower().encode("latin-1")
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be >= 1")
        self.max_body_bytes = max_body_bytes
        self.failure_statuses = frozenset(failure_statuses)
        low, high = retry_after_bounds
        if not 0 <= low <= high:
            raise ValueError("retry_after_bounds must be (low, high) with 0 <= low <= high")
        self.retry_after_bounds = (low, high)
        # Request headers the app must not see from the client: ours are set by the middleware.
        self.request_drop = _OWN_HEADERS | {self.tier_header}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = self.routes.match(scope["path"])
        if policy is None:
            await self.app(scope, receive, send)
            return
        await _Exchange(self, scope, receive, send, policy).run()


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


class _Exchange:
    """One routed request: what was read from the client, and each attempt at the app."""

    __slots__ = (
        "attempts",
        "body",
        "buffered",
        "complete",
        "disconnected",
        "mw",
        "payload",
        "policy",
        "receive",
        "rewrite",
        "scope",
        "send",
        "tier",
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
        self.body = b""
        self.payload: Payload | None = None
        self.rewrite = False
        self.disconnected = False
        self.attempts = 0
        self.tier = ""

    async def run(self) -> None:
        try:
            tier = await self._read_tier()
        except TierError as err:
            await err.send(self.send)
            return
        except ClientGone:
            return  # nobody is left to answer, and the app need not spend a model call
        if tier is None:
            await self.mw.app(self.scope, self._replaying(), self.send)
            return
        self.tier = tier
        await self._route()

    # -- reading the request ------------------------------------------------------------------

    async def _read_tier(self) -> str | None:
        mw = self.mw
        found: list[tuple[str, str]] = []
        content_type = length = None
        chunked = False
        for raw_name, value in self.scope["headers"]:
            name = raw_name.lower()
            if name == mw.tier_header:
                found.append(("header", header_tier(value)))
            elif name == b"content-type":
                content_type = value
            elif name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = True
        # An explicitly opted-in route is a JSON LLM endpoint: bad bodies are rejected. With
        # routes=None only a request that names a tier is ours; anything else goes on untouched.
        strict = mw.routes.explicit or bool(found)
        declared = _content_length(length)
        if content_type is not None and _is_json(content_type):
            if declared is not None and declared > mw.max_body_bytes:
                if strict:
                    raise _too_large(mw.max_body_bytes)
                return None
            await self._buffer(strict)
            if not self.complete:
                return None
            if self.body:
                self.payload = parse_object(self.body)
                if self.payload is None:
                    if strict:
                        raise bad_request("invalid_json", "the request body must be a JSON object")
                    return None
                found += body_tiers(self.payload.data, mw.tier_field, mw.model_field)
                self.rewrite = True
        elif not strict:
            return None
        elif (declared is not None and declared <= mw.max_body_bytes) or (
            declared is None and not chunked
        ):
            # Not JSON but small enough to hold: keep it so a failed call can be replayed.
            await self._buffer(strict)
        tier = agree(found)
        policy = self.policy
        if tier is None:
            tier = policy.default_tier
            if tier is None:
                if policy.require_tier:
                    raise bad_request("tier_required", "this route requires a tier", param="tier")
                return None
        config = mw.router.config
        if tier not in config:
            raise invalid_tier(
                f"unknown tier {tier!r}; valid tiers: {', '.join(config.tier_order)}"
            )
        if policy.allowed_tiers is not None and tier not in policy.allowed_tiers:
            raise TierError(
                403,
                "tier_not_allowed",
                f"tier {tier!r} is not allowed on this route; allowed: "
                f"{', '.join(t for t in config.tier_order if t in policy.allowed_tiers)}",
                param="tier",
            )
        return tier

    async def _buffer(self, strict: bool) -> None:
        try:
            self.body = await read_body(self._receive_live, self.mw.max_body_bytes)
        except BodyTooLarge as exc:
            if strict:
                raise _too_large(self.mw.max_body_bytes) from None
            self.buffered = exc.chunks
            self.complete = False
            return
        self.buffered = [self.body]

    async def _receive_live(self) -> Message:
        # The server sends http.disconnect once; every later caller must see it too.
        if self.disconnected:
            return _DISCONNECT
        message = await self.receive()
        if message["type"] == "http.disconnect":
            self.disconnected = True
        return message

    def _replaying(self) -> Receive:
        """`receive` for an unrouted request: what was read first, then the live stream."""
        if self.buffered is None:
            return self.receive
        pending = [
            {
                "type": "http.request",
                "body": b"".join(self.buffered),
                "more_body": not self.complete,
            }
        ]

        async def receive() -> Message:
            return pending.pop() if pending else await self._receive_live()

        return receive

    # -- calling the app ----------------------------------------------------------------------

    async def _route(self) -> None:
        mw = self.mw
        try:
            selection = await mw.router.select(self.tier)
        except NoHealthyModel as exc:
            await service_unavailable(
                "service_unavailable",
                f"all models for tier {exc.tier!r} are temporarily unavailable",
                exc.retry_after,
                mw.retry_after_bounds,
            ).send(self.send, [(b"x-tier", self.tier.encode()), (b"x-tier-attempts", b"0")])
            return
        base_headers = self._base_headers()
        tried: list[Key] = []
        # A body that was not held (a large upload, say) cannot be sent twice.
        max_attempts = self.policy.max_attempts if self.buffered is not None else 1
        next_selection: Selection | None = selection
        while next_selection is not None:
            selection = next_selection
            self.attempts += 1
            tried.append(selection.key)
            attempt = _Attempt(self, selection, self.attempts < max_attempts, tried)
            next_selection = await attempt.run(base_headers)

    def _base_headers(self) -> Headers:
        drop = self.mw.request_drop | _BODY_FRAMING if self.rewrite else self.mw.request_drop
        return [(k, v) for k, v in self.scope["headers"] if k.lower() not in drop]

    async def alternative(self, tried: list[Key]) -> Selection | None:
        if self.disconnected:
            return None
        try:
            return await self.mw.router.select(self.tier, exclude=tried)
        except NoHealthyModel:
            return None


class _Attempt:
    """One call of the app with one model; decides at response start whether to retry."""

    __slots__ = (
        "can_retry",
        "exchange",
        "failed",
        "next",
        "pending",
        "recorded",
        "selection",
        "started",
        "tried",
    )

    def __init__(
        self, exchange: _Exchange, selection: Selection, can_retry: bool, tried: list[Key]
    ) -> None:
        self.exchange = exchange
        self.selection = selection
        self.can_retry = can_retry
        self.tried = tried
        self.pending = True  # the body has not been handed to the app yet
        self.started = False  # a response start went to the client
        self.recorded = False  # health already knows this attempt's outcome
        self.failed = False  # ... and it was a failure
        self.next: Selection | None = None  # set when this response is dropped for a retry

    async def run(self, base_headers: Headers) -> Selection | None:
        """Call the app; returns the selection to retry with, or None when done."""
        ex = self.exchange
        sel = self.selection
        health = ex.mw.health
        scope = self._scope(base_headers)
        token = _current.set(sel)
        try:
            await ex.mw.app(scope, self.receive, self.send)
        except Exception:
            if self.next is not None:
                return self.next  # the failure was recorded and its response dropped already
            if ex.disconnected:
                self._release()
                raise
            if not self.failed:  # an exception, even after a good start, is the provider failing
                self.recorded = self.failed = True
                health.record_failure(sel.provider, sel.model)
            if not self.started and self.can_retry:
                alternative = await ex.alternative(self.tried)
                if alternative is not None:
                    logger.debug("retrying after an exception", extra={"tier": sel.tier})
                    return alternative
            raise
        except BaseException:  # cancellation: nothing learned about the model
            self._release()
            raise
        finally:
            _current.reset(token)
        if not self.recorded:
            self._release()  # the app answered nothing, or the client left
        return self.next

    def _release(self) -> None:
        if not self.recorded:
            self.recorded = True
            self.exchange.mw.health.release(self.selection.provider, self.selection.model)

    def _scope(self, base_headers: Headers) -> Scope:
        ex = self.exchange
        sel = self.selection
        headers = list(base_headers)
        if ex.rewrite:
            assert ex.payload is not None
            data = ex.payload.data
            data.pop(ex.mw.tier_field, None)
            data[ex.mw.model_field] = sel.model
            ex.body = ex.payload.dumps()
            headers.append((b"content-length", str(len(ex.body)).encode()))
        headers += [
            (b"x-tier", sel.tier.encode()),
            (b"x-tier-provider", sel.provider.encode()),
            (b"x-tier-model", sel.model.encode()),
        ]
        scope = dict(ex.scope)
        scope["headers"] = headers
        # scope["state"] is shared by reference: each attempt gets its own copy.
        state = scope.get("state")
        state = dict(state) if state else {}
        state["tier_selection"] = sel
        scope["state"] = state
        return scope

    async def receive(self) -> Message:
        ex = self.exchange
        if self.pending and ex.buffered is not None:
            self.pending = False
            return {"type": "http.request", "body": ex.body, "more_body": False}
        return await ex._receive_live()

    async def send(self, message: Message) -> None:
        if message["type"] != "http.response.start":
            if self.next is None:
                await self.exchange.send(message)
            return  # draining a response that will be retried
        ex = self.exchange
        sel = self.selection
        health = ex.mw.health
        status = message["status"]
        headers = message.get("headers") or ()
        self.recorded = True
        if status in ex.mw.failure_statuses:
            self.failed = True
            health.record_failure(sel.provider, sel.model, _retry_after(headers))
            if self.can_retry:
                self.next = await ex.alternative(self.tried)
                if self.next is not None:
                    return
        elif status < 400:
            health.record_success(sel.provider, sel.model)
        else:  # the caller's fault: says nothing about the model
            health.release(sel.provider, sel.model)
        out: Headers = [(k, v) for k, v in headers if k.lower() not in _OWN_HEADERS]
        out += [
            (b"x-tier", sel.tier.encode()),
            (b"x-tier-provider", sel.provider.encode()),
            (b"x-tier-model", sel.model.encode()),
            (b"x-tier-attempts", str(ex.attempts).encode()),
        ]
        self.started = True
        await ex.send({**message, "headers": out})


def _content_length(value: bytes | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _too_large(limit: int) -> TierError:
    return TierError(
        413, "request_too_large", f"the request body exceeds the limit of {limit} bytes"
    )


def _retry_after(headers: Any) -> float | None:
    """A failure response's own Retry-After (`retry-after-ms` first), in seconds."""
    seconds = None
    for name, value in headers:
        name = name.lower()
        if name == b"retry-after-ms":
            try:
                return float(value) / 1000.0
            except ValueError:
                continue
        if name == b"retry-after":
            text = value.decode("latin-1").strip()
            try:
                seconds = float(text)
            except ValueError:
                try:
                    when = email.utils.parsedate_to_datetime(text)
                    seconds = when.timestamp() - time.time()
                except (TypeError, ValueError):
                    continue
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        return None
    return seconds
