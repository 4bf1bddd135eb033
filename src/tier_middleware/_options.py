"""The middleware's option groups, shaped like `HealthConfig`: small frozen dataclasses that
validate when made, so a bad value fails where it is written."""

from __future__ import annotations

import math
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ._sessions import Identity

# 408: the provider timed out (SDKs retry it); 529: Anthropic's "overloaded", like a 503.
DEFAULT_FAILURE_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 529})
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Sticky sessions: the request header naming one (None: no sessions), how long one lives
    unused (seconds), how many one instance keeps in process, and who owns one
    (`identity(scope) -> str`; default: a hash of the Authorization header)."""

    header: str | None = "x-session-id"
    ttl: float = 3600.0
    max_sessions: int = 100_000
    identity: Identity | None = None

    def __post_init__(self) -> None:
        if self.header is not None and not self.header:
            raise ValueError("SessionConfig.header must be a header name or None")
        if not (isinstance(self.ttl, int | float) and self.ttl > 0):
            raise ValueError(f"session ttl must be > 0, got {self.ttl!r}")
        max_sessions = self.max_sessions
        if isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or max_sessions < 1:
            raise ValueError(f"max_sessions must be an integer >= 1, got {max_sessions!r}")


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """Retries and what clients are told: the retry budget (retries in flight at most `budget`
    of the routed requests in flight, never fewer than `budget_min`), the app's statuses that
    are model failures, how long an attempt may take to start its response (None: no limit),
    and the clamp of the Retry-After the middleware sends."""

    budget: float = 0.2
    budget_min: int = 3
    failure_statuses: Collection[int] = field(default=DEFAULT_FAILURE_STATUSES)
    attempt_timeout: float | None = 60.0
    retry_after_bounds: tuple[int, int] = (1, 60)

    def __post_init__(self) -> None:
        if not self.budget >= 0:
            raise ValueError(f"retry_budget must be >= 0, got {self.budget!r}")
        if self.budget_min < 0:
            raise ValueError(f"retry_budget_min must be >= 0, got {self.budget_min!r}")
        object.__setattr__(self, "failure_statuses", frozenset(self.failure_statuses))
        object.__setattr__(
            self, "attempt_timeout", seconds_or_none("attempt_timeout", self.attempt_timeout)
        )
        low, high = self.retry_after_bounds
        if not 0 <= low <= high:
            raise ValueError("retry_after_bounds must be (low, high) with 0 <= low <= high")
        object.__setattr__(self, "retry_after_bounds", (low, high))


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What a routed request may cost the middleware: the largest body it holds (bytes) and how
    long the whole body may take to arrive (seconds; None: no limit)."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1:
            raise ValueError("max_body_bytes must be >= 1")
        object.__setattr__(self, "body_timeout", seconds_or_none("body_timeout", self.body_timeout))


def seconds_or_none(name: str, value: object) -> float | None:
    """A duration option: a positive, finite number of seconds, or None (no limit)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds or None, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {value!r}")
    return float(value)


# The keyword arguments the middleware took before the groups: (group, field).
_FLAT = {
    "session_header": ("sessions", "header"),
    "session_ttl": ("sessions", "ttl"),
    "max_sessions": ("sessions", "max_sessions"),
    "identity": ("sessions", "identity"),
    "retry_budget": ("retries", "budget"),
    "retry_budget_min": ("retries", "budget_min"),
    "failure_statuses": ("retries", "failure_statuses"),
    "attempt_timeout": ("retries", "attempt_timeout"),
    "retry_after_bounds": ("retries", "retry_after_bounds"),
    "max_body_bytes": ("limits", "max_body_bytes"),
    "body_timeout": ("limits", "body_timeout"),
}
_GROUPS = {"sessions": "SessionConfig", "retries": "RetryConfig", "limits": "RequestLimits"}


def grouped(
    sessions: SessionConfig | None,
    retries: RetryConfig | None,
    limits: RequestLimits | None,
    flat: Mapping[str, Any],
) -> tuple[SessionConfig, RetryConfig, RequestLimits]:
    """The three groups, with the deprecated flat keywords (`session_ttl=`, ...) folded in."""
    changes: dict[str, dict[str, Any]] = {"sessions": {}, "retries": {}, "limits": {}}
    for name, value in flat.items():
        where = _FLAT.get(name)
        if where is None:
            raise TypeError(f"TierRoutingMiddleware() got an unexpected keyword argument {name!r}")
        group, option = where
        warnings.warn(
            f"{name}= is deprecated; use {group}={_GROUPS[group]}({option}=...)",
            DeprecationWarning,
            stacklevel=3,  # the caller of TierRoutingMiddleware(...)
        )
        changes[group][option] = value
    return (
        replace(sessions or SessionConfig(), **changes["sessions"]),
        replace(retries or RetryConfig(), **changes["retries"]),
        replace(limits or RequestLimits(), **changes["limits"]),
    )
