"""Every error of the package: one hierarchy under `TierMiddlewareError`, and the answers the
middleware gives itself (stable codes, one rendering: the OpenAI error shape)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec

from ._asgi import send_json
from ._types import Headers, Send


class TierMiddlewareError(Exception):
    """Base class of every exception this package raises."""


class ConfigError(TierMiddlewareError, ValueError):
    """A tier configuration that cannot be used; the message names source, tier, model and field."""


class RoutingError(TierMiddlewareError):
    """Base class of the errors `TierRouter.select` raises."""


class UnknownTierError(RoutingError):
    def __init__(self, tier: str, valid_tiers: tuple[str, ...]) -> None:
        self.tier = tier
        self.valid_tiers = valid_tiers
        shown = tier if len(tier) <= 64 else tier[:64] + "..."
        super().__init__(f"unknown tier {shown!r}; valid tiers: {', '.join(valid_tiers)}")


class NoHealthyModelError(RoutingError):
    def __init__(self, tier: str, retry_after: float) -> None:
        self.tier = tier
        self.retry_after = retry_after
        super().__init__(f"no healthy model for tier {tier!r}; retry in {math.ceil(retry_after)} s")


# The names before 0.x; kept so that `except NoHealthyModel` goes on working.
UnknownTier = UnknownTierError
NoHealthyModel = NoHealthyModelError


class RequestError(TierMiddlewareError):
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


# -- 4xx: the request's fault ----------------------------------------------------------------


def bad_request(code: str, message: str, param: str | None = None) -> RequestError:
    return RequestError(400, code, message, param=param)


def invalid_tier(message: str) -> RequestError:
    return bad_request("invalid_tier", message, param="tier")


def conflicting_tier(message: str) -> RequestError:
    return bad_request("conflicting_tier", message, param="tier")


def tier_required() -> RequestError:
    return bad_request("tier_required", "this route requires a tier", param="tier")


def not_an_object() -> RequestError:
    return bad_request("invalid_json", "the request body must be a JSON object")


def too_deep() -> RequestError:
    return bad_request(
        "invalid_json", "the request body is nested deeper than the JSON parser goes"
    )


def invalid_session_id() -> RequestError:
    return bad_request(
        "invalid_session_id",
        "the session id must be 1-128 characters of A-Z, a-z, 0-9, '.', '_', ':' or '-'",
        param="session_id",
    )


def tier_not_allowed(message: str) -> RequestError:
    return RequestError(403, "tier_not_allowed", message, param="tier")


def request_timeout(seconds: float) -> RequestError:
    return RequestError(
        408, "request_timeout", f"the request body did not arrive within {seconds:g} s"
    )


def too_large(limit: int) -> RequestError:
    return RequestError(
        413, "request_too_large", f"the request body exceeds the limit of {limit} bytes"
    )


# -- 503: nothing can serve the request now -------------------------------------------------


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
) -> RequestError:
    return RequestError(
        503,
        code,
        message,
        type="service_unavailable",
        headers=retry_after_headers(retry_after, bounds),
    )


def provider_misconfigured(provider: str, bounds: tuple[int, int]) -> RequestError:
    """The chosen provider's call could not be dispatched (no base URL, no key): Retry-After
    the longest of `bounds`, for a misconfiguration outlasts any retry."""
    message = f"provider {provider!r} is not configured correctly on this server"
    return service_unavailable("provider_misconfigured", message, bounds[1], bounds)


def attempt_timed_out(seconds: float, bounds: tuple[int, int]) -> RequestError:
    """The model did not start its answer in time: Retry-After the shortest of `bounds`."""
    message = f"the model did not answer within {seconds:g} s"
    return service_unavailable("attempt_timeout", message, bounds[0], bounds)


# seconds: a config fetch is retried in the background meanwhile
CONFIG_RETRY_AFTER = 5.0


def config_unavailable(message: str, bounds: tuple[int, int]) -> RequestError:
    """No tier configuration to route with (none fetched yet, or none could be loaded)."""
    return service_unavailable("config_unavailable", message, CONFIG_RETRY_AFTER, bounds)


def tier_unavailable(tier: str, retry_after: float, bounds: tuple[int, int]) -> RequestError:
    """No model of `tier` may take a request now: Retry-After says when the first one may."""
    message = f"all models for tier {tier!r} are temporarily unavailable"
    return service_unavailable("service_unavailable", message, retry_after, bounds)
