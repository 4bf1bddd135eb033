"""OpenTelemetry spans for routed requests, when `opentelemetry-api` is installed (the `otel`
extra) and a tracer provider is set.

Per routed request a span `tier_routing {tier}`, a child of whatever span is current (the
server span of `opentelemetry-instrumentation-asgi` or `-fastapi`), and per attempt a child
`chat {model}` that is the current span while the app runs, so the provider call's span (the
one `opentelemetry-instrumentation-httpx` makes) nests under it. Attribute names follow the
GenAI semantic conventions v1.44.0 (status "development"; the new names only: `gen_ai.provider.name`,
`gen_ai.usage.input_tokens`, ...), plus our own `tier.*`. No prompt or completion text, and no
value from the request except the tier name once validated against the config.

Tracing off (no API installed, no provider set, or the no-op provider): the middleware builds a
plain `Exchange` per request and nothing here runs. Tracing on: `TracedExchange` and
`TracedAttempt` add hooks to the request's flow; a tracer that raises is swallowed and counted
(`<ns>_tracing_errors_total`), never failing a request.
"""

from __future__ import annotations

import importlib
import time
from typing import TYPE_CHECKING, Any

from ._attempt import Attempt
from ._attribution import Verdict
from ._errors import NoHealthyModelError
from ._exchange import Exchange
from ._router import Selection, TierRouter
from ._sessions import Decision
from ._types import Message

if TYPE_CHECKING:
    from ._middleware import TierRoutingMiddleware

try:  # guarded: the package imports and runs without opentelemetry
    _trace: Any = importlib.import_module("opentelemetry.trace")
    _context: Any = importlib.import_module("opentelemetry.context")
except ImportError:
    _trace = _context = None

SCHEMA_URL = "https://opentelemetry.io/schemas/1.44.0"
_SCOPE = "tier_middleware"
_MAX_MODEL = 256  # a reply's model name longer than this is not recorded


def tracer_for(provider: Any) -> Any:
    """The tracer of `provider` (default: the global one), or None when nothing would record:
    no opentelemetry-api, no provider set yet (the API's proxy), or the no-op provider."""
    if _trace is None:
        if provider is not None:
            raise ValueError(
                "tracer_provider needs opentelemetry-api: pip install 'tier-middleware[otel]'"
            )
        return None
    if provider is None:
        provider = _trace.get_tracer_provider()
        if isinstance(provider, _trace.ProxyTracerProvider):
            return None
    if isinstance(provider, _trace.NoOpTracerProvider):
        return None
    return provider.get_tracer(_SCOPE, schema_url=SCHEMA_URL)


class TracedAttempt(Attempt):
    """An attempt that remembers its verdict and what failed, for its span."""

    __slots__ = ("ended", "error", "span", "status", "verdict")

    def __init__(self, exchange: Exchange, selection: Selection, can_retry: bool) -> None:
        super().__init__(exchange, selection, can_retry)
        self.span: Any = None
        self.ended: int | None = None  # time_ns when the app returned, for the span's end
        self.verdict: Verdict | None = None
        self.error: str | None = None  # error.type
        self.status: int | None = None

    def begin(self) -> None:
        super().begin()
        exchange = self.exchange
        assert isinstance(exchange, TracedExchange)
        exchange.attempt_began(self)

    def fail(self, retry_after: float | None) -> None:
        self.verdict = Verdict.MODEL_FAILURE
        super().fail(retry_after)

    async def _neutral(self, verdict: Verdict) -> None:
        if self.verdict is None:
            self.verdict = verdict
        await super()._neutral(verdict)

    async def _not_dispatched(self) -> None:
        self.verdict = Verdict.APP_ERROR
        self.error = "provider_misconfigured"
        await super()._not_dispatched()

    async def raised(self, exc: Exception) -> bool:
        if self.error is None:
            self.error = type(exc).__qualname__
        return await super().raised(exc)

    async def _start(self, message: Message) -> Message | None:
        self.status = message["status"]
        start = await super()._start(message)
        if self.verdict is None and self.started:
            self.verdict = Verdict.SUCCESS
        return start


class TracedExchange(Exchange):
    """A routed request that records its routing span and one span per attempt."""

    __slots__ = (
        "begun",
        "client_send",
        "poisoned",
        "raised",
        "retry_after",
        "routing",
        "spans",
        "status",
        "suspect_now",
        "token",
        "unavailable",
        "upgraded_from",
    )

    attempt_type = TracedAttempt

    def __init__(self, mw: TierRoutingMiddleware, *args: Any) -> None:
        super().__init__(mw, *args)
        self.begun = time.time_ns()
        self.routing: Any = None
        self.spans: list[TracedAttempt] = []
        self.token: Any = None  # the attached context of the attempt running now
        self.status: int | None = None
        self.retry_after: int | None = None
        self.unavailable = False
        self.poisoned = False
        self.suspect_now = False
        self.raised: str | None = None  # error.type of an exception that left the middleware
        self.upgraded_from: str | None = None
        self.client_send = self.send
        self.send = self._send

    async def run(self) -> None:
        try:
            await super().run()
        except Exception as exc:  # the app's, passed on: the 500 is answered outside
            self.raised = type(exc).__qualname__
            raise
        finally:
            self._finish()

    async def _send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            status = self.status = message["status"]
            if status == 503:
                for name, value in message.get("headers") or ():
                    if name.lower() == b"retry-after" and value.isdigit():
                        self.retry_after = int(value)
        await self.client_send(message)

    # -- hooks --------------------------------------------------------------------------------

    async def _select(self, router: TierRouter) -> tuple[str, Decision | None, Selection]:
        key, decision, selection = await super()._select(router)
        if decision is not None:
            self.upgraded_from = decision.upgraded_from
        return key, decision, selection

    async def _unavailable(self, exc: NoHealthyModelError) -> None:
        self.unavailable = True
        await super()._unavailable(exc)

    async def settle(self) -> None:
        # A known suspect's failures are released uncounted: verdict "suspect". A body that has
        # now failed on two models becomes one: the routing span says so.
        self.poisoned = self.suspect()
        await super().settle()
        if self.poisoned or self.mw.health.evidence.suspect(self.fingerprint()):
            self.suspect_now = True

    def attempt_began(self, attempt: TracedAttempt) -> None:
        """The app is called for `attempt`: its span starts, and is current while the app runs."""
        try:
            self._detach()
            routing = self._routing()
            sel = attempt.selection
            attempt.span = self.mw.tracer.start_span(
                f"chat {sel.model}",
                context=_trace.set_span_in_context(routing),
                kind=_trace.SpanKind.CLIENT,
                attributes={
                    "gen_ai.operation.name": "chat",
                    "gen_ai.provider.name": sel.provider,
                    "gen_ai.request.model": sel.model,
                    "tier.name": sel.tier,
                    "tier.attempt": self.attempts,
                },
            )
            self.spans.append(attempt)
            self.token = _context.attach(_trace.set_span_in_context(attempt.span))
        except Exception:
            self.mw.metrics.tracing_error()

    # -- spans --------------------------------------------------------------------------------

    def _routing(self) -> Any:
        if self.routing is None:
            self.routing = self.mw.tracer.start_span(
                f"tier_routing {self.tier}",
                kind=_trace.SpanKind.INTERNAL,
                start_time=self.begun,
                attributes={"tier.name": self.tier},
            )
        return self.routing

    def _detach(self) -> None:
        token, self.token = self.token, None
        if token is not None:
            _context.detach(token)
            self.spans[-1].ended = time.time_ns()

    def _finish(self) -> None:
        try:
            self._detach()
            if self.routing is None and not self.tier:
                return  # not routed: no tier, or one the config does not know
            routing = self._routing()
            previous: str | None = None
            for attempt in self.spans:
                previous = self._end_attempt(attempt, previous)
            attributes: dict[str, Any] = {"tier.name": self.tier, "tier.attempts": self.attempts}
            if self.upgraded_from is not None:
                attributes["tier.session.upgraded_from"] = self.upgraded_from
            if self.status is not None:
                attributes["http.response.status_code"] = self.status
            if self.retry_after is not None:
                attributes["tier.retry_after"] = self.retry_after
            if self.unavailable:
                attributes["tier.unavailable"] = True
                attributes["error.type"] = "tier_unavailable"
            elif self.raised is not None:
                attributes["error.type"] = self.raised
            elif self.status is not None and self.status >= 500:
                attributes["error.type"] = str(self.status)
            if self.suspect_now:
                attributes["tier.suspect"] = True
            routing.update_name(f"tier_routing {self.tier}")
            routing.set_attributes(attributes)
            if "error.type" in attributes:
                routing.set_status(_trace.StatusCode.ERROR)
            routing.end()
        except Exception:
            self.mw.metrics.tracing_error()

    def _end_attempt(self, attempt: TracedAttempt, previous: str | None) -> str | None:
        """End `attempt`'s span with its verdict; the error.type it failed with, if it failed."""
        span = attempt.span
        verdict = attempt.verdict
        attributes: dict[str, Any] = {}
        if previous is not None:
            attributes["tier.retry_reason"] = previous
        if attempt.next is not None:
            attributes["tier.retried"] = True
        error = None
        if verdict is not None:
            suspect = verdict is Verdict.MODEL_FAILURE and self.poisoned
            attributes["tier.verdict"] = "suspect" if suspect else verdict.value
            if verdict is not Verdict.SUCCESS:
                status = attempt.status
                error = attempt.error or (
                    str(status) if status is not None and status >= 400 else "_OTHER"
                )
                attributes["error.type"] = error
        tap = attempt.tap
        if tap is not None:
            usage = tap.result()
            if usage is not None:
                attributes["gen_ai.usage.input_tokens"] = usage[0]
                attributes["gen_ai.usage.output_tokens"] = usage[1]
            model = getattr(tap, "model", None)
            if model is not None and len(model) <= _MAX_MODEL:
                attributes["gen_ai.response.model"] = model
        span.set_attributes(attributes)
        if error is not None:
            span.set_status(_trace.StatusCode.ERROR)
        span.end(end_time=attempt.ended)
        return error if attempt.next is not None else None


__all__ = ["SCHEMA_URL", "TracedAttempt", "TracedExchange", "tracer_for"]
