"""Sticky sessions: a conversation keeps its model, and its tier may go up but never down."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

from ._config import TierConfig
from ._router import Selection, TierRouter
from ._stores.base import SessionRecord
from ._types import Scope

_SESSION_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")

Identity = Callable[[Scope], str]


def valid_session_id(raw: bytes) -> str | None:
    """The session id when it is 1-128 characters of [A-Za-z0-9._:-], else None."""
    return raw.decode("ascii") if _SESSION_ID.fullmatch(raw) else None


def default_identity(scope: Scope) -> str:
    """Who owns a session: the caller's Authorization header (only its hash is kept)."""
    for name, value in scope["headers"]:
        if name.lower() == b"authorization":
            return str(value.decode("latin-1"))
    return ""


def session_key(identity: str, session_id: str) -> str:
    """The storage key: a hash of the identity, so one caller cannot address another's session
    and no secret reaches the store."""
    owner = hashlib.blake2b(identity.encode(), digest_size=16).hexdigest() if identity else "anon"
    return f"{owner}:{session_id}"


@dataclass(frozen=True, slots=True)
class Decision:
    """What a session makes of a request: the model to call, and the record to store (if any)."""

    selection: Selection
    record: SessionRecord | None  # to write: created, upgraded or moved off a failing model
    upgraded_from: str | None = None


def held_tier(config: TierConfig, record: SessionRecord | None, tier: str) -> str:
    """The tier a session holds a request asking for `tier` at: the session's own when it is
    higher (a session never goes down a tier), else `tier`."""
    if record is None or record.tier not in config or record.tier == tier:
        return tier
    return record.tier if config.rank(record.tier) > config.rank(tier) else tier


async def decide(
    router: TierRouter, record: SessionRecord | None, tier: str, now: float
) -> Decision:
    """Apply the session rules.

    - no session: select and create one;
    - same tier: the session's model while it is healthy, else select again preferring the
      same provider;
    - a lower tier: keep the session's tier and model (never downgrade);
    - a higher tier: select in the new tier preferring the session's provider.
    Raises what `router.select` raises (NoHealthyModelError).
    """
    config = router.config
    if record is None or record.tier not in config:
        selection = await router.select(tier)
        return Decision(selection, _record(selection, now, now))
    if config.rank(tier) > config.rank(record.tier):
        selection = await router.select(tier, preferred_provider=record.provider)
        return Decision(selection, _record(selection, record.created_at, now), record.tier)
    pinned = await router.pin(record.tier, record.provider, record.model)
    if pinned is not None:
        return Decision(pinned, None)
    selection = await router.select(record.tier, preferred_provider=record.provider)
    return Decision(selection, _record(selection, record.created_at, now))


def _record(selection: Selection, created_at: float, now: float) -> SessionRecord:
    return SessionRecord(selection.provider, selection.model, selection.tier, created_at, now)
