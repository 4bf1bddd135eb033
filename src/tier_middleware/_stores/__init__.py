"""State backends: in process (memory://) or shared by a fleet (redis://, rediss://, unix://)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from .base import HealthSnapshot, SessionRecord, Store, StoreError
from .memory import MemoryStore
from .redis import RedisStore

__all__ = [
    "HealthSnapshot",
    "MemoryStore",
    "RedisStore",
    "SessionRecord",
    "Store",
    "StoreError",
    "store_from_url",
]

_REDIS_SCHEMES = frozenset({"redis", "rediss", "unix"})
SUPPORTED_SCHEMES = ("memory://", "redis://", "rediss://", "unix://")


def store_from_url(url: str | None, **options: Any) -> Store:
    """The backend a URL names: None or memory:// keeps state in process; redis://, rediss://
    and unix:// use Redis. `options` go to the backend's constructor unchanged."""
    if url is None:
        return MemoryStore(**options)
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme == "memory":
        return MemoryStore(**options)
    if scheme in _REDIS_SCHEMES:
        return RedisStore(url, **options)
    raise ValueError(
        f"unsupported state backend URL {_redact(url)!r}: expected one of "
        f"{', '.join(SUPPORTED_SCHEMES)} (or None for in-process state)"
    )


def _redact(url: str) -> str:
    """The URL without a password, for error messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return parts._replace(netloc=netloc).geturl()
    except ValueError:
        return "<unparsable URL>"
