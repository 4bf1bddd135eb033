"""Tier configurations several test modules share (each call returns a fresh dict to mutate)."""

from __future__ import annotations

from typing import Any


def two_per_tier(version: str | None = None) -> dict[str, Any]:
    """Two models per tier (openai and anthropic), equal weights: a retry always has somewhere
    to go, and a session can move to the other provider."""
    config: dict[str, Any] = {
        "tiers": {
            "simple": [
                {"provider": "openai", "model": "mini", "relative_cost": 1},
                {"provider": "anthropic", "model": "haiku", "relative_cost": 1},
            ],
            "moderate": [
                {"provider": "openai", "model": "4o", "relative_cost": 1},
                {"provider": "anthropic", "model": "sonnet", "relative_cost": 1},
            ],
            "complex": [
                {"provider": "openai", "model": "o3", "relative_cost": 1},
                {"provider": "anthropic", "model": "opus", "relative_cost": 1},
            ],
        }
    }
    if version is not None:
        config["version"] = version
    return config


def weighted(version: str | None = None) -> dict[str, Any]:
    """Simple has two models of different cost (mini weighs twice haiku); moderate and complex
    have one each."""
    config: dict[str, Any] = {
        "tiers": {
            "simple": [
                {"provider": "openai", "model": "mini", "relative_cost": 1},
                {"provider": "anthropic", "model": "haiku", "relative_cost": 2},
            ],
            "moderate": [{"provider": "openai", "model": "4o", "relative_cost": 4}],
            "complex": [{"provider": "anthropic", "model": "opus", "relative_cost": 10}],
        }
    }
    if version is not None:
        config["version"] = version
    return config


def real_names(flash_cost: int = 1, providers: dict[str, Any] | None = None) -> dict[str, Any]:
    """Real model names: simple has gpt-4o-mini and gemini-2.0-flash (its cost `flash_cost`),
    moderate and complex one model each; `providers` is the optional dispatch table."""
    config: dict[str, Any] = {
        "tiers": {
            "simple": [
                {"provider": "openai", "model": "gpt-4o-mini", "relative_cost": 1},
                {"provider": "google", "model": "gemini-2.0-flash", "relative_cost": flash_cost},
            ],
            "moderate": [{"provider": "openai", "model": "gpt-4o", "relative_cost": 5}],
            "complex": [{"provider": "anthropic", "model": "claude-opus-4", "relative_cost": 20}],
        }
    }
    if providers is not None:
        config["providers"] = providers
    return config
