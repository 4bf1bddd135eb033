"""The one small async interface every state backend implements."""

from __future__ import annotations

import abc
import sys
from dataclasses import dataclass

import msgspec

from .._health import HealthConfig

# (provider, model) -> (consecutive failures, backoff end as wall-clock seconds, 0.0 if none)
HealthSnapshot = dict[tuple[str, str], tuple[int, float]]


class StoreError(Exception):
    """A backend failed (timeout, connection refused, bad reply); callers fall back in process."""


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

    Every method may raise StoreError; none may block longer than the backend's timeout.
    Keys passed in are already safe (validated session ids, hashed identities).
    """

    name: str  # "memory" or "redis": the `backend` label of backend error metrics

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

    @abc.abstractmethod
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
