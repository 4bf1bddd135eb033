"""Reading the tier a request asks for: body field, header, or `model: "tier:<name>"`."""

from __future__ import annotations

from typing import Any

from ._body import Payload, repeated
from ._errors import TierError, bad_request

MAX_TIER_LENGTH = 64
MODEL_PREFIX = "tier:"


def _shown(value: str) -> str:
    return value if len(value) <= 40 else value[:40] + "..."


def invalid_tier(message: str) -> TierError:
    return bad_request("invalid_tier", message, param="tier")


def clean_tier(value: Any, source: str) -> str:
    """Normalise one tier value (trim, lowercase) or raise 400 `invalid_tier`."""
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise invalid_tier(f"the tier in {source} must be a string, got {kind}")
    if len(value) > MAX_TIER_LENGTH * 4:  # bound the work before stripping a huge string
        raise invalid_tier(f"the tier in {source} is longer than {MAX_TIER_LENGTH} characters")
    tier = value.strip().lower()
    if not tier:
        raise invalid_tier(f"the tier in {source} is empty")
    if len(tier) > MAX_TIER_LENGTH:
        raise invalid_tier(f"the tier in {source} is longer than {MAX_TIER_LENGTH} characters")
    return tier


def tier_from_model(model: Any) -> str | None:
    """The tier named by `"model": "tier:<name>"`, or None for an ordinary model value."""
    if isinstance(model, str) and model[:5].lower() == MODEL_PREFIX:
        return clean_tier(model[5:], "model 'tier:<name>'")
    return None


def header_tier(raw: bytes) -> str:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise invalid_tier("the tier header must be ASCII") from None
    if not text.isprintable():
        raise invalid_tier("the tier header contains control characters")
    return clean_tier(text, "header")


def agree(found: list[tuple[str, str]]) -> str | None:
    """One tier from all sources that named one, or 400 `conflicting_tier` when they differ."""
    if not found:
        return None
    tier = found[0][1]
    for source, other in found[1:]:
        if other != tier:
            first = found[0][0]
            raise bad_request(
                "conflicting_tier",
                f"the tier in {first} ({_shown(tier)!r}) and in {source} ({_shown(other)!r}) differ",
                param="tier",
            )
    return tier


def body_tiers(
    payload: Payload, body: bytes, tier_field: str, model_field: str
) -> list[tuple[str, str]]:
    """(source, tier) for the tier field and a `tier:` model of the body. A member named more
    than once at the top level counts once per occurrence (`conflicting_tier` if they differ):
    parsers disagree on which one wins, so the middleware does not pick one for the client."""
    found = []
    if tier_field in payload.members:
        values = repeated(body, tier_field)
        source = "body field '" + tier_field + "'"
        if values is None:
            found.append((source, clean_tier(payload.value(tier_field), "body")))
        else:
            tiers = {clean_tier(value, "body") for value in values}
            if len(tiers) > 1:
                raise _twice(tier_field, values)
            found.append((source, tiers.pop()))
    if model_field not in payload.members:
        return found
    values = repeated(body, model_field)
    if values is not None:
        named = [tier_from_model(value) for value in values]
        if any(t is not None for t in named) and len({repr(v) for v in values}) > 1:
            raise _twice(model_field, values)
        model_tier = named[0]
    else:
        model_tier = tier_from_model(payload.value(model_field))
    if model_tier is not None:
        found.append(("model", model_tier))
    return found


def _twice(field: str, values: list[Any]) -> TierError:
    shown = ", ".join(repr(_shown(v) if isinstance(v, str) else v)[:60] for v in values[:3])
    return bad_request(
        "conflicting_tier",
        f"the body names {field!r} {len(values)} times, with different values ({shown})",
        param="tier",
    )
