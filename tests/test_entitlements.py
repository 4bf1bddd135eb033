"""`authorize=`: which caller may use which tier, sync or async, with sessions."""

from __future__ import annotations

import json
from typing import Any

import pytest

from asgi_harness import Provider, call
from tier_middleware import TierConfig, TierRoutingMiddleware

pytestmark = pytest.mark.anyio

CONFIG = TierConfig.load(
    {
        "tiers": {
            "simple": [{"provider": "openai", "model": "mini", "relative_cost": 1}],
            "moderate": [{"provider": "openai", "model": "4o", "relative_cost": 4}],
            "complex": [{"provider": "anthropic", "model": "opus", "relative_cost": 10}],
        }
    }
)
# The documented recipe: each API key has a highest tier it may use.
HIGHEST = {"sk-basic": "simple", "sk-team": "moderate", "sk-pro": "complex"}


def api_key(scope: Any) -> str:
    for name, value in scope["headers"]:
        if name == b"authorization":
            return str(value.decode().removeprefix("Bearer "))
    return ""


def up_to_highest(scope: Any, tier: str) -> bool:
    highest = HIGHEST.get(api_key(scope))
    return highest is not None and CONFIG.rank(tier) <= CONFIG.rank(highest)


async def async_up_to_highest(scope: Any, tier: str) -> bool:
    return up_to_highest(scope, tier)


def request(tier: str, key: str, session: str | None = None) -> dict[str, Any]:
    headers = [("content-type", "application/json"), ("authorization", f"Bearer {key}")]
    if session:
        headers.append(("x-session-id", session))
    return {"body": json.dumps({"tier": tier}).encode(), "headers": headers}


@pytest.mark.parametrize("authorize", [up_to_highest, async_up_to_highest])
async def test_callers_reach_their_tiers_and_no_higher(authorize: Any) -> None:
    provider = Provider()
    mw = TierRoutingMiddleware(provider, config=CONFIG, routes=["/chat"], authorize=authorize)
    ok = await call(mw, path="/chat", **request("moderate", "sk-team"))
    denied = await call(mw, path="/chat", **request("complex", "sk-team"))
    stranger = await call(mw, path="/chat", **request("simple", "sk-unknown"))
    assert ok.status == 200
    for result in (denied, stranger):
        assert result.status == 403
        assert result.json()["error"]["code"] == "tier_not_allowed"
    assert provider.models == ["4o"]


async def test_a_session_cannot_carry_a_caller_above_their_entitlement() -> None:
    allowed = {"complex"}

    def authorize(scope: Any, tier: str) -> bool:
        return tier in allowed or tier == "simple"

    provider = Provider()
    mw = TierRoutingMiddleware(provider, config=CONFIG, routes=["/chat"], authorize=authorize)
    assert (await call(mw, path="/chat", **request("complex", "k", "conv"))).status == 200
    allowed.clear()  # the caller's plan changed; the session is still at complex
    result = await call(mw, path="/chat", **request("simple", "k", "conv"))
    assert result.status == 403
    assert provider.models == ["opus"]
