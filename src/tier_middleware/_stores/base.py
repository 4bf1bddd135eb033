"""The one small async interface every state backend implements.

Errors are wrapped here, once: every implementation of a backend call, in any subclass, is
wrapped when the class is made, so whatever it raises reaches the caller as a StoreError (the
original as __cause__), and a new backend cannot forget to. Cancellation is not an Exception, and
propagates.
"""

from __future__ import annotations

import abc
import functools
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from .._errors import TierMiddlewareError
from .._health import HealthConfig

# (provider, model) -> (consecutive failures, backoff end as wall-clock seconds, 0.0 if none)
HealthSnapshot = dict[tuple[str, str], tuple[int, float]]

R = TypeVar("R")


class StoreError(TierMiddlewareError):
    """A backend failed (timeout, connection refused, bad reply); callers fall back in process."""


@dataclass(frozen=True, slots=True)
class Failure:
    """A failure to count against a model, fleet-wide: the arguments of `_health.backoff_step`
    that come from the caller. Times are wall-clock seconds."""

    config: HealthConfig
    retry_after: float | None
    now: float
    started: float  # when the failed attempt began
    jitter_factor: float


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """Where one conversation is pinned. Times are wall-clock seconds (time.time())."""

    provider: str
    model: str
    tier: str
    created_at: float
    updated_at: float

    def dumps(self) -> bytes:
        return msgspec.json.encode(
            [self.provider, self.model, self.tier, self.created_at, self.updated_at]
        )

    @classmethod
    def loads(cls, raw: bytes | str) -> SessionRecord | None:
        """The record, or None for anything that is not one (a corrupt or foreign value)."""
        try:
            provider, model, tier, created, updated = msgspec.json.decode(raw)
            if not all(isinstance(v, str) for v in (provider, model, tier)):
                return None
            # Interned: the names come from the config, and a local copy of every session an
            # instance serves then holds one string per name, not three per session.
            return cls(
                sys.intern(provider),
                sys.intern(model),
                sys.intern(tier),
                float(created),
                float(updated),
            )
        except (TypeError, ValueError, RecursionError):  # msgspec.DecodeError is a ValueError
            return None


class Store(abc.ABC):
    """Sessions, the shared config copy, a fleet-wide lock and (optionally) shared health.

    Every backend call raises StoreError and nothing else (see the module docstring); none may
    block longer than the backend's timeout. `ping` answers False instead of raising. Keys passed
    in are already safe (validated session ids, hashed identities).

    `class MyStore(Store, wrap_errors=False)` leaves a backend's own calls unwrapped: only for one
    that cannot fail (MemoryStore: the wrapper would cost more than its dict operations).
    """

    name: str  # "memory" or "redis": the `backend` label of backend error metrics

    def __init_subclass__(cls, *, wrap_errors: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if wrap_errors:
            for name in _BACKEND_CALLS & cls.__dict__.keys():
                setattr(cls, name, _store_errors(name.lstrip("_"), cls.__dict__[name]))

    # -- sessions ------------------------------------------------------------------------------

    @abc.abstractmethod
    async def get_session(self, key: str, ttl: float) -> SessionRecord | None:
        """Read a session and restart its sliding TTL, in one round trip."""

    @abc.abstractmethod
    async def put_session(self, key: str, record: SessionRecord, ttl: float) -> None:
        """Create or replace a session with a TTL of `ttl` seconds."""

    @abc.abstractmethod
    async def get_session_and_health(
        self, key: str, ttl: float
    ) -> tuple[SessionRecord | None, HealthSnapshot]:
        """`get_session` and `health_snapshot` in one round trip."""

    async def session_count(self) -> int | None:
        """Number of live sessions, where that is cheap to know; None otherwise."""
        return None

    # -- the shared config copy ---------------------------------------------------------------

    @abc.abstractmethod
    async def get_config(self) -> tuple[bytes, float] | None:
        """The last config fetched by any instance (raw JSON) and when (wall clock), if any."""

    @abc.abstractmethod
    async def put_config(self, raw: bytes, fetched_at: float) -> None:
        """Store the last-known-good config. It never expires: freshness is `fetched_at`."""

    @abc.abstractmethod
    async def try_lock(self, name: str, ttl: float) -> str | None:
        """Take a fleet-wide lock for `ttl` seconds; returns a token, or None if it is held."""

    @abc.abstractmethod
    async def unlock(self, name: str, token: str) -> None:
        """Release a lock taken with `token` (a no-op if it expired or was taken over)."""

    @abc.abstractmethod
    async def hold_lock(self, name: str, token: str, ttl: float) -> bool:
        """Keep a lock taken with `token` for `ttl` seconds from now instead of releasing it;
        False (and nothing changed) if it expired or was taken over meanwhile."""

    # -- shared health --------------------------------------------------------------------------

    @abc.abstractmethod
    async def health_snapshot(self) -> HealthSnapshot:
        """Every (provider, model) with failures recorded, fleet-wide."""

    async def record_failure(
        self,
        provider: str,
        model: str,
        config: HealthConfig,
        retry_after: float | None,
        now: float,
        jitter_factor: float = 1.0,
        *,
        started: float | None = None,
    ) -> tuple[int, float]:
        """Atomically count a failure and extend the backoff as `HealthTracker` would
        (`_health.backoff_step`).

        `now` and `started` (when the failed attempt began; None: now) are wall-clock seconds; an
        attempt that began before the current backoff did steps nothing up, whichever instance
        it ran on. Returns (consecutive failures, backoff end or 0.0 below the threshold).
        `jitter_factor` is drawn by the caller in [1 - jitter, 1 + jitter].
        """
        started = now if started is None else started
        failure = Failure(config, retry_after, now, started, jitter_factor)
        return await self._record_failure(provider, model, failure)

    @abc.abstractmethod
    async def _record_failure(
        self, provider: str, model: str, failure: Failure
    ) -> tuple[int, float]:
        """What a backend implements of `record_failure`: the same, the arguments gathered."""

    @abc.abstractmethod
    async def record_success(self, provider: str, model: str) -> None:
        """Forget the model's failures (it answered)."""

    @abc.abstractmethod
    async def try_probe(self, provider: str, model: str, ttl: float) -> bool:
        """Take the fleet-wide half-open probe lease for the model (SET NX PX semantics)."""

    @abc.abstractmethod
    async def release_probe(self, provider: str, model: str) -> None:
        """Give the probe lease back."""

    # -- lifecycle --------------------------------------------------------------------------------

    async def ping(self) -> bool:
        """Whether the backend answers now (a cheap health probe)."""
        return True

    async def aclose(self) -> None:  # noqa: B027  (optional for backends that own nothing)
        """Release connections."""


# The calls that reach the backend: a subclass's own implementation of any of them is wrapped.
# (`record_failure` is implemented here, through `_record_failure`; an override is wrapped too.)
_BACKEND_CALLS = Store.__abstractmethods__ | {"record_failure", "session_count"}


def _store_errors(
    operation: str, call: Callable[..., Awaitable[R]]
) -> Callable[..., Coroutine[Any, Any, R]]:
    """`call`, raising StoreError for anything it raises."""

    @functools.wraps(call)
    async def wrapped(store: Store, /, *args: Any, **kwargs: Any) -> R:
        try:
            return await call(store, *args, **kwargs)
        except StoreError:
            raise  # wrapped already: an override that called its base class's implementation
        except Exception as exc:
            message = f"{store.name} {operation} failed: {type(exc).__name__}: {exc}"
            raise StoreError(message) from exc

    return wrapped
