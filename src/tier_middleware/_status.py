"""A JSON status page: each router's config version, sessions and, per tier, every model's
probability of being chosen and its health, as of the request."""

from __future__ import annotations

import itertools
import logging
import math
import threading
import weakref
from typing import Any, Protocol

import anyio
import msgspec

from ._asgi import SmallApp, send_json
from ._router import TierRouter
from ._types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger("tier_middleware")

# How long the page waits for one source's session count before showing null.
SESSION_COUNT_TIMEOUT = 1.0
_NO_STORE = (b"cache-control", b"no-store")


class StatusSource(Protocol):
    """What the status page reads from a middleware (or anything else that routes)."""

    @property
    def name(self) -> str: ...

    @property
    def router(self) -> TierRouter | None: ...  # None until a first config arrived

    @property
    def config_source_name(self) -> str: ...

    async def session_count(self) -> int | None: ...


_sources: weakref.WeakValueDictionary[int, StatusSource] = weakref.WeakValueDictionary()
_order = itertools.count()
_lock = threading.Lock()


def register_status_source(source: StatusSource) -> None:
    """Show `source` on status pages built without explicit sources, for as long as it lives
    (only a weak reference is kept). Registering it again changes nothing."""
    with _lock:
        if any(existing is source for existing in _sources.values()):
            return
        _sources[next(_order)] = source


def unregister_status_source(source: StatusSource) -> None:
    with _lock:
        for key, existing in list(_sources.items()):
            if existing is source:
                del _sources[key]


def registered_status_sources() -> list[StatusSource]:
    """The live registered sources, in registration order."""
    with _lock:
        return [source for _, source in sorted(_sources.items())]


def _seconds(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, 3)


async def _session_count(source: StatusSource, limit: float) -> int | None:
    try:
        with anyio.move_on_after(limit):
            count = await source.session_count()
            return count if isinstance(count, int) and not isinstance(count, bool) else None
    except Exception:
        logger.warning("cannot count sessions for the status page", exc_info=True)
    return None


def _tiers(router: TierRouter) -> dict[str, list[dict[str, Any]]]:
    config = router.config
    health = router.health
    tiers: dict[str, list[dict[str, Any]]] = {}
    for tier in config.tier_order:
        probabilities = router.probabilities(tier)
        rows = []
        for m in config.models(tier):
            state = health.status(m.provider, m.model)
            rows.append(
                {
                    "provider": m.provider,
                    "model": m.model,
                    "relative_cost": m.relative_cost,
                    "probability": probabilities.get(m.key, 0.0),
                    "health": state.state,
                    "consecutive_failures": state.consecutive_failures,
                    "backoff_remaining": _seconds(state.backoff_remaining),
                    # failures of distinct requests that no request got past, waiting for
                    # agreement before they count against the model
                    "unconfirmed_failures": state.unconfirmed_failures,
                }
            )
        tiers[tier] = rows
    return tiers


async def status_document(
    sources: list[StatusSource], *, session_timeout: float = SESSION_COUNT_TIMEOUT
) -> dict[str, Any]:
    """The status page's content as a dict."""
    routers = []
    for source in sources:
        router = source.router
        # Read before awaiting anything, so the tiers are those of the version shown.
        entry: dict[str, Any] = {
            "name": source.name,
            "config": None,
            "sessions": None,
            "tiers": {},
        }
        if router is not None:
            config = router.config
            entry["config"] = {
                "version": config.version,
                "updated_at": config.updated_at,
                "source": source.config_source_name,
            }
            entry["tiers"] = _tiers(router)
        entry["sessions"] = await _session_count(source, session_timeout)
        routers.append(entry)
    return {"routers": routers}


def status_app(*sources: StatusSource, session_timeout: float = SESSION_COUNT_TIMEOUT) -> ASGIApp:
    """An ASGI app answering GET (and HEAD) at any path with the status of `sources` as JSON,
    or, when none are given, of the sources registered when the request arrives. Other methods
    get 405. `app.add_route("/status", status_app())`."""
    fixed = list(sources)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            body = msgspec.json.encode({"error": f"method {method} not allowed; use GET"})
            await send_json(send, 405, body, [_NO_STORE, (b"allow", b"GET, HEAD")])
            return
        document = await status_document(
            fixed or registered_status_sources(), session_timeout=session_timeout
        )
        body = msgspec.json.encode(document)
        await send_json(send, 200, body, [_NO_STORE], head=method == "HEAD")

    return SmallApp(app)


__all__ = [
    "StatusSource",
    "register_status_source",
    "registered_status_sources",
    "status_app",
    "status_document",
    "unregister_status_source",
]
