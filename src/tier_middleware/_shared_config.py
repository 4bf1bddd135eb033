"""The fleet's shared tier config: one copy in a `Store`, and the lock that decides which instance
fetches it from the control plane.

`ConfigManager` decides when to read, lock and write; `SharedConfig` only speaks to the store.
Whatever the store raises, of any type, is a store failure: it is counted, logged once per outage
(`Outage`), and reported to the caller as `StoreDown`, so that the refresh goes on without it.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import anyio
import msgspec

from ._config import ConfigError, TierConfig
from ._outage import OnBackendError, Outage
from ._stores.base import Store

logger = logging.getLogger("tier_middleware")

LOCK_NAME = "config"


class Copy(NamedTuple):
    config: TierConfig
    fetched_at: float  # wall clock


class StoreDown(Exception):
    """A call to the store failed; it has been counted and logged already."""


class SharedConfig:
    """The copy and the lock in `store`. A lock is taken for `lock_ttl` seconds: the longest
    a fetch can hold it before its copy is there (or it failed)."""

    def __init__(self, store: Store, *, lock_ttl: float, on_error: OnBackendError | None) -> None:
        self.store = store
        self.lock_ttl = lock_ttl
        self._outage = Outage(
            "store unavailable for the shared tier config; fetching directly",
            "store available again for the shared tier config",
            on_error,
        )

    async def read(self) -> Copy | None:
        """The stored copy; None when there is none or it is unusable. Raises StoreDown."""
        try:
            return _parse(await self.store.get_config())
        except Exception as exc:
            raise self._down("get_config", exc) from None

    async def lock(self) -> str | None:
        """Take the lock: its token, or None while another instance holds it. Raises StoreDown."""
        try:
            return await self.store.try_lock(LOCK_NAME, ttl=self.lock_ttl)
        except Exception as exc:
            raise self._down("try_lock", exc) from None

    async def put(self, raw: bytes, fetched_at: float) -> None:
        """Store a fetched config for the fleet; a failure is counted and logged, not raised."""
        try:
            await self.store.put_config(raw, fetched_at)
        except Exception as exc:
            self._down("put_config", exc)

    async def release(self, token: str, hold_for: float | None) -> None:
        """Free the lock, or keep it `hold_for` more seconds; a failure is not raised."""
        try:
            if hold_for is not None:
                await self.store.hold_lock(LOCK_NAME, token, hold_for)
            else:
                await self.store.unlock(LOCK_NAME, token)
        except Exception as exc:
            self._down("hold_lock" if hold_for is not None else "unlock", exc)

    async def await_holder(self) -> tuple[str | None, Copy | None]:
        """With the lock held by another instance: wait (at most the lock's TTL, real time) for
        the copy its holder stores, or for the lock to be free. Returns (our lock token, None),
        (None, the copy), or (None, None) when the lock is still held (its holder's fetch
        failed) or the store failed."""
        pause = 0.05
        with anyio.move_on_after(self.lock_ttl):
            while True:
                await anyio.sleep(pause)
                pause = min(pause * 2, 0.25)
                try:
                    copy = await self.read()
                    if copy is not None:
                        return None, copy
                    token = await self.lock()
                except StoreDown:
                    return None, None
                if token is not None:
                    return token, None
        return None, None

    def ok(self) -> None:
        """A call succeeded: ends an outage (logged once)."""
        if self._outage.failing:
            self._outage.ok(self.store.name)

    def _down(self, operation: str, exc: Exception) -> StoreDown:
        self._outage.failed(self.store.name, operation, exc)
        return StoreDown(operation)


def _parse(got: tuple[bytes, float] | None) -> Copy | None:
    if got is None:
        return None
    raw, fetched_at = got
    try:
        data = msgspec.json.decode(raw)
        config = TierConfig.from_data(data, source_name="the store's config copy")
    except (ValueError, RecursionError, ConfigError) as exc:
        logger.debug("ignoring an unusable shared config copy", extra={"error": str(exc)})
        return None
    return Copy(config, float(fetched_at))


__all__ = ["LOCK_NAME", "Copy", "SharedConfig", "StoreDown"]
