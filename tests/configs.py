"""Tier configurations several test modules share (each call returns a fresh dict to mutate)."""

from __future__ import annotations

from typing import Any


def entry(provider: str, name: str, cost: int = 1, **fields: Any) -> dict[str, Any]:
    """One model of a tier, at relative cost `cost`, with any further fields (`weight`, prices)."""
    return {"provider": provider, "model": name, "relative_cost": cost, **fields}


def one_tier(*models: dict[str, Any], version: str | None = None) -> dict[str, Any]:
    """Only a "simple" tier, holding `models` in this order."""
    config: dict[str, Any] = {"tiers": {"simple": list(models)}, "tier_order": ["simple"]}
    if version is not None:
        config["version"] = version
    return config


def two_per_tier(version: str | None = None) -> dict[str, Any]:
    """Two models per tier (openai and anthropic), equal weights: a retry always has somewhere
    to go, and a session can move to the other provider."""
    config: dict[str, Any] = {
        "tiers": {
            "simple": [entry("openai", "mini"), entry("anthropic", "haiku")],
            "moderate": [entry("openai", "4o"), entry("anthropic", "sonnet")],
            "complex": [entry("openai", "o3"), entry("anthropic", "opus")],
        }
    }
    if version is not None:
        config["version"] = version
    return config


def one_per_tier(version: str | None = None) -> dict[str, Any]:
    """One model per tier: mini (cost 1), 4o (4) and opus (10)."""
    config: dict[str, Any] = {
        "tiers": {
            "simple": [entry("openai", "mini")],
            "moderate": [entry("openai", "4o", 4)],
            "complex": [entry("anthropic", "opus", 10)],
        }
    }
    if version is not None:
        config["version"] = version
    return config


def weighted(version: str | None = None, haiku_cost: int = 2) -> dict[str, Any]:
    """one_per_tier() with haiku after mini in simple, at `haiku_cost` (by default haiku costs
    twice mini, so mini weighs twice haiku)."""
    config = one_per_tier(version)
    config["tiers"]["simple"].append(entry("anthropic", "haiku", haiku_cost))
    return config


def real_names(
    flash_cost: int = 1,
    providers: dict[str, Any] | None = None,
    more: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Real model names: simple has gpt-4o-mini and gemini-2.0-flash (its cost `flash_cost`),
    moderate and complex one model each; `more` appends models to the tiers it names, after
    these; `providers` is the optional dispatch table."""
    config: dict[str, Any] = {
        "tiers": {
            "simple": [
                entry("openai", "gpt-4o-mini"),
                entry("google", "gemini-2.0-flash", flash_cost),
            ],
            "moderate": [entry("openai", "gpt-4o", 5)],
            "complex": [entry("anthropic", "claude-opus-4", 20)],
        }
    }
    for tier, models in (more or {}).items():
        config["tiers"][tier].extend(models)
    if providers is not None:
        config["providers"] = providers
    return config
