"""One call of the app with one model: its `receive` and `send`, which decide at response start
whether the response goes out or is dropped for a retry, and the verdict on how it went."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ._attribution import Verdict, judge_exception, judge_status, retry_after_of
from ._request import OWN_HEADERS, by_name
from ._router import Selection
from ._types import Headers, Message, Scope
from ._usage import JsonUsageTap, UsageTap

if TYPE_CHECKING:
    from ._exchange import Exchange

# `x-tier-attempts` values, encoded once.
_ATTEMPTS = tuple((b"x-tier-attempts", str(n).encode()) for n in range(16))


class Attempt:
    __slots__ = (
        "began",
        "body",
        "can_retry",
        "exchange",
        "failed",
        "next",
        "pending",
        "recorded",
        "selection",
        "started",
        "started_at",
        "tap",
    )

    def __init__(self, exchange: Exchange, selection: Selection, can_retry: bool) -> None:
        self.exchange = exchange
        self.selection = selection
        self.can_retry = can_retry
        self.body = exchange.body  # what the app receives: rewritten for this model, if JSON
        self.pending = True  # the body has not been handed to the app yet
        self.started = False  # a response start went to the client
        self.recorded = False  # the outcome is told (to health, or held by the exchange)
        self.failed = False  # ... and it was a model failure
        self.next: Selection | None = None  # set when this response is dropped for a retry
        self.tap: UsageTap | None = None
        self.began = 0.0  # on the health clock
        self.started_at = 0.0  # perf_counter, for the duration histogram

    def scope(self, base_headers: Headers) -> Scope:
        """The scope the app gets: rewritten body's length, the choice in headers and state."""
        ex = self.exchange
        sel = self.selection
        headers = base_headers.copy()
        if ex.payload is not None:
            mw = ex.mw
            self.body = ex.payload.rewrite(mw.tier_field, mw.model_field, sel.model)
            headers.append((b"content-length", str(len(self.body)).encode()))
        headers += sel.headers
        # scope["state"] is shared by reference: each attempt gets its own copy.
        state = ex.scope.get("state")
        return {
            **ex.scope,
            "headers": headers,
            "state": {**state, "tier_selection": sel} if state else {"tier_selection": sel},
        }

    def begin(self) -> None:
        """The app is called now."""
        self.began = self.exchange.mw.health.clock()
        self.started_at = time.perf_counter()

    def fail(self, retry_after: float | None) -> None:
        """A model failure: the exchange holds it until the request's outcome says whose."""
        self.recorded = self.failed = True
        self.exchange.hold_failure((self.selection, retry_after, self.began))

    async def release(self) -> None:
        """Nothing learned about the model (a caller error, a disconnect): give back its probe
        slot, if it held one."""
        if not self.recorded:
            self.recorded = True
            await self.exchange.mw.state.release(self.selection)

    async def _neutral(self, verdict: Verdict) -> None:
        if verdict is Verdict.CALLER_ERROR and not self.recorded:
            self.exchange.mw.metrics.caller_error(self.selection)
        await self.release()

    async def raised(self, exc: Exception) -> bool:
        """Judge an exception the app raised. True when the request goes on with another model
        (the exception is then dropped); False when it must propagate."""
        ex = self.exchange
        if ex.disconnected:
            await self.release()
            return False
        if self.failed:
            return False  # a failure response went out already; raising adds nothing
        verdict, retry_after = judge_exception(exc, ex.mw.failure_statuses)
        if verdict is not Verdict.MODEL_FAILURE:
            await self._neutral(verdict)
            return False
        self.fail(retry_after)  # raising, even after a good start, is failing
        if self.started or not self.can_retry or ex.suspect():
            return False
        self.next = await ex.alternative()
        return self.next is not None

    async def receive(self) -> Message:
        ex = self.exchange
        if self.pending and ex.buffered is not None:
            self.pending = False
            return {"type": "http.request", "body": self.body, "more_body": False}
        return await ex.receive_live()

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            start = await self._start(message)
            if start is None:
                return  # dropped: this attempt's failure is retried on another model
            message = start
        elif self.next is not None:
            return  # draining a response that will be retried
        elif self.tap is not None and message["type"] == "http.response.body":
            self.tap.feed(message.get("body", b""))
        try:
            await self.exchange.send(message)
        except Exception:
            # The server's send fails once the client has gone (ASGI 2.4: OSError): whatever
            # the app makes of that, it is no provider failure.
            self.exchange.disconnected = True
            raise

    async def _start(self, message: Message) -> Message | None:
        """Judge the status; the response start to send, with our headers, or None when the
        response is dropped for a retry."""
        ex = self.exchange
        sel = self.selection
        mw = ex.mw
        status = message["status"]
        headers = message.get("headers") or ()
        mw.metrics.duration(sel, time.perf_counter() - self.started_at)
        verdict = judge_status(status, mw.failure_statuses)
        if verdict is Verdict.SUCCESS:
            self.recorded = True
            if ex.failures is None and not mw.state.shared_health:
                mw.health.record_success(sel.provider, sel.model)  # the common case
            else:
                await ex.succeeded(sel)
        elif verdict is Verdict.MODEL_FAILURE:
            self.fail(retry_after_of(headers))
            if self.can_retry and not ex.suspect():
                self.next = await ex.alternative()
                if self.next is not None:
                    return None
            # The request ends with this failure: judge it before the client can send another.
            await ex.settle()
        else:
            await self._neutral(verdict)
        out, content_type, encoding = _response_headers(headers)
        out += sel.headers
        attempts = ex.attempts
        out.append(
            _ATTEMPTS[attempts]
            if attempts < len(_ATTEMPTS)
            else (b"x-tier-attempts", str(attempts).encode())
        )
        if content_type is not None and 200 <= status < 300:
            self.tap = (
                JsonUsageTap()  # by far the most common
                if content_type == b"application/json" and encoding is None
                else UsageTap.for_content_type(status, content_type, encoding)
            )
        self.started = True
        return {**message, "headers": out}


def _response_headers(headers: Any) -> tuple[Headers, bytes | None, bytes | None]:
    """The app's response headers without any of ours, its content-type and content-encoding."""
    named = by_name(headers)
    if named is not None and OWN_HEADERS.isdisjoint(named):  # what frameworks send
        return list(headers), named.get(b"content-type"), named.get(b"content-encoding")
    out: Headers = []
    content_type = encoding = None
    for name, value in headers:
        lowered = name.lower()
        if lowered in OWN_HEADERS:
            continue
        if lowered == b"content-type":
            content_type = value
        elif lowered == b"content-encoding":
            encoding = value
        out.append((name, value))
    return out, content_type, encoding
