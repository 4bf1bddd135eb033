"""One call of the app with one model: its `receive` and `send`, which decide at response start
whether the response goes out or is dropped for a retry, and the verdict on how it went."""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from ._attribution import Verdict, judge_exception, judge_status, retry_after_of
from ._errors import attempt_timed_out, provider_misconfigured, retry_after_headers
from ._request import OWN_HEADERS
from ._router import Selection, TierRouter
from ._timeouts import Deadline
from ._types import Headers, Message, Scope
from ._usage import JsonUsageTap, UsageTap

if TYPE_CHECKING:
    from ._exchange import Exchange

# `x-tier-attempts` values, encoded once.
_ATTEMPTS = tuple((b"x-tier-attempts", str(n).encode()) for n in range(16))

# The attempt the app is handling now: `current_selection()` and `UpstreamTransport` read it.
current_attempt: ContextVar[Attempt | None] = ContextVar("tier_attempt", default=None)


def current_selection() -> Selection | None:
    """The model chosen for the request being handled, inside the app; None elsewhere."""
    attempt = current_attempt.get()
    return None if attempt is None else attempt.selection


class Attempt:
    # Class defaults, as for a request: an attempt that goes well changes few of them.
    pending = True  # the body has not been handed to the app yet
    started = False  # a response start went to the client
    recorded = False  # the outcome is told (to health, or held by the exchange)
    failed = False  # ... and it was a model failure
    next: Selection | None = None  # set when this response is dropped for a retry
    dropped = False  # the app's response is not sent (a retry, or our own answer)
    tap: UsageTap | None = None
    began = 0.0  # on the health clock (monotonic): the in-flight rule and the duration
    # What the provider calls the app made through UpstreamTransport said (see `report`).
    upstream: Verdict | None = None  # the verdict on the last call
    upstream_retry_after: float | None = None
    recovered = False  # a call failed, and a later one (an SDK retry) succeeded
    misconfigured: str | None = None  # why the call could not be dispatched
    deadline: Deadline | None = None  # the attempt_timeout, until the start

    def __init__(self, exchange: Exchange, selection: Selection, can_retry: bool) -> None:
        self.exchange = exchange
        self.selection = selection
        self.can_retry = can_retry
        self.body = exchange.body  # what the app receives: rewritten for this model, if JSON

    def scope(self, base_headers: Headers) -> Scope:
        """The scope the app gets: rewritten body's length, the choice in headers and state."""
        ex = self.exchange
        sel = self.selection
        payload = ex.payload
        if payload is not None:
            mw = ex.mw
            body = self.body = payload.rewrite(mw.tier_field, mw.model_field, sel.model)
            length = (b"content-length", str(len(body)).encode())
            headers = [*base_headers, length, *sel._headers]
        else:
            headers = [*base_headers, *sel._headers]
        scope = ex.scope
        # scope["state"] is shared by reference: each attempt gets its own copy.
        state = scope.get("state")
        return {
            **scope,
            "headers": headers,
            "state": {**state, "tier_selection": sel} if state else {"tier_selection": sel},
        }

    def begin(self) -> None:
        """The app is called now."""
        self.began = self.exchange.mw.health.clock()

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

    def report(self, verdict: Verdict, retry_after: float | None = None) -> None:
        """The provider's own outcome of one call the app made (from `UpstreamTransport`): it
        decides this attempt's verdict instead of the app's answer. Cheap and bounded: a
        hundred calls keep one verdict, not a hundred records."""
        if verdict is Verdict.MODEL_FAILURE:
            self.upstream_retry_after = retry_after
            if self.started and not self.failed:
                self.fail(retry_after)  # a stream broke after the response went out
        elif verdict is Verdict.SUCCESS and self.upstream is Verdict.MODEL_FAILURE:
            self.recovered = True
        self.upstream = verdict

    def _judged(self, verdict: Verdict, retry_after: float | None) -> tuple[Verdict, float | None]:
        """The verdict, once the provider's reports (if any) are taken into account;
        `retry_after` is the app's own (its response's or its exception's)."""
        upstream = self.upstream
        if upstream is None:
            return verdict, retry_after
        if upstream is Verdict.SUCCESS:
            if self.recovered:  # the app's SDK got past a failure on this model: it was its
                self.recovered = False
                self.exchange.hold_failure((self.selection, self.upstream_retry_after, self.began))
            # The provider answered: a 429/5xx or a crash of the app's own is the app's error.
            return (Verdict.APP_ERROR if verdict is Verdict.MODEL_FAILURE else verdict), None
        if upstream is Verdict.MODEL_FAILURE:  # whatever the app made of it (even a 200)
            return upstream, self.upstream_retry_after or retry_after
        return upstream, None  # the provider's 4xx: the caller's, whatever the app answered

    async def _not_dispatched(self) -> None:
        """The call could not go to the chosen provider (`misconfigured`): another model, else
        our own 503 instead of the app's answer. No health change: the model was never asked."""
        self.dropped = True
        await self.release()
        if await self._retry(judged=False):
            return
        mw = self.exchange.mw
        error = provider_misconfigured(self.selection.provider, mw.retry_after_bounds)
        await error.send(self.exchange.send, self.selection._headers)

    async def answer_timeout(self) -> None:
        """The last attempt timed out: our own 503 (the failure is held like any other)."""
        ex = self.exchange
        if not ex.disconnected:  # else nobody is left to answer
            error = attempt_timed_out(ex.mw.attempt_timeout or 0.0, ex.mw.retry_after_bounds)
            await error.send(ex.send, self.selection._headers)

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
        if self.misconfigured is not None and not self.started:
            await self._not_dispatched()
            return True
        verdict, retry_after = self._judged(*judge_exception(exc, ex.mw.failure_statuses))
        if verdict is not Verdict.MODEL_FAILURE:
            await self._neutral(verdict)
            return False
        self.fail(retry_after)  # raising, even after a good start, is failing
        return not self.started and await self._retry()

    async def _retry(self, judged: bool = True) -> bool:
        """The one retry decision: whether another model takes the request (`next` is set).
        Only while this attempt may be retried, and, after a judged failure, not for a body
        that already failed on two models (it would fail on a third)."""
        if not self.can_retry or (judged and self.exchange.suspect()):
            return False
        self.next = await self.exchange.alternative(self.selection)
        return self.next is not None

    async def receive(self) -> Message:
        ex = self.exchange
        if self.pending and ex.buffered is not None:
            self.pending = False
            return {"type": "http.request", "body": self.body, "more_body": False}
        return await ex.receive_live()

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            if self.dropped:
                return  # draining a response that is not sent
            tap = self.tap
            if tap is not None:
                tap.feed(message.get("body", b""))
        elif kind == "http.response.start":
            start = await self._start(message)
            if start is None:
                return  # dropped: retried on another model, or answered by us
            message = start
        elif self.dropped:
            return
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
        if self.deadline is not None:
            self.deadline.settle()
        mw.metrics.duration(sel, mw.health.clock() - self.began)
        if status < 400 and self.upstream is None and self.misconfigured is None:
            self.recorded = True  # a success, by far the most common answer
            if ex.failures is None and not mw.state.shared_health:
                mw.health.record_success(sel.provider, sel.model)
            else:
                await ex.succeeded(sel)
        elif not await self._judge(status, headers):
            return None
        out, content_type, encoding = _response_headers(headers)
        if status == 503 and mw.router is not None:
            out += _retry_after_if_down(mw.router, ex.tier, out, mw.retry_after_bounds)
        out += sel._headers
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

    async def _judge(self, status: int, headers: Any) -> bool:
        """The verdict on a response that is not a plain success: whether it goes out (False:
        it is dropped, for a retry on another model or an answer of our own)."""
        if self.misconfigured is not None:
            await self._not_dispatched()
            return False
        ex = self.exchange
        verdict = judge_status(status, ex.mw.failure_statuses)
        retry_after = None
        if verdict is Verdict.MODEL_FAILURE or self.upstream is not None:
            # The response's own Retry-After is read only where it can matter: not after a
            # provider success or 4xx (the common case with UpstreamTransport).
            upstream = self.upstream
            own = (
                retry_after_of(headers)
                if upstream is None or upstream is Verdict.MODEL_FAILURE
                else None
            )
            verdict, retry_after = self._judged(verdict, own)
        if verdict is Verdict.SUCCESS:
            self.recorded = True
            await ex.succeeded(self.selection)
        elif verdict is Verdict.MODEL_FAILURE:
            self.fail(retry_after)
            if await self._retry():
                self.dropped = True
                return False
            # The request ends with this failure: judge it before the client can send another.
            await ex.settle()
        else:
            await self._neutral(verdict)
        return True


def _response_headers(headers: Any) -> tuple[Headers, bytes | None, bytes | None]:
    """The app's response headers without any of ours, its content-type and content-encoding.
    A loop rather than a dict: a response carries a handful of headers, lowercase."""
    out: Headers = []
    content_type = encoding = None
    for pair in headers:
        name = pair[0]
        if name.startswith(b"x-tier") or not name.islower():
            name = name.lower()
            if name in OWN_HEADERS:
                continue
        if name == b"content-type":
            content_type = pair[1]
        elif name == b"content-encoding":
            encoding = pair[1]
        out.append(pair)
    return out, content_type, encoding


def _retry_after_if_down(
    router: TierRouter, tier: str, headers: Headers, bounds: tuple[int, int]
) -> Headers:
    """For a 503 that goes out without a Retry-After while no model of the tier may take a
    request: when the next one may, as the middleware's own 503 would say."""
    if any(name.lower() in (b"retry-after", b"retry-after-ms") for name, _ in headers):
        return []
    wait = router.unavailable_for(tier) if tier in router.ranks else None
    return [] if wait is None else retry_after_headers(wait, bounds)
