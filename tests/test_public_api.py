"""The public surface of `tier_middleware`: pinned so additions and removals are deliberate."""

import importlib

import pytest

import tier_middleware

# Keep this list in plain `sorted()` order (capitals first); add each newly exported name here.
EXPECTED_PUBLIC_NAMES = [
    "ConfigError",
    "ControlPlaneSource",
    "HealthConfig",
    "HealthTracker",
    "ModelConfig",
    "ModelHealth",
    "NoHealthyModel",
    "ProviderConfig",
    "RoutePolicy",
    "RoutingError",
    "Selection",
    "TierConfig",
    "TierRouter",
    "TierRoutingMiddleware",
    "UnknownTier",
    "UpstreamTransport",
    "current_selection",
    "metrics_app",
    "status_app",
]


def test_expected_list_is_sorted() -> None:
    assert sorted(EXPECTED_PUBLIC_NAMES) == EXPECTED_PUBLIC_NAMES


def test_all_is_pinned_and_sorted() -> None:
    assert list(tier_middleware.__all__) == EXPECTED_PUBLIC_NAMES


@pytest.mark.parametrize("name", tier_middleware.__all__)
def test_every_public_name_is_importable(name: str) -> None:
    module = importlib.import_module("tier_middleware")
    assert getattr(module, name) is not None
    namespace: dict[str, object] = {}
    exec(f"from tier_middleware import {name}", namespace)
    assert namespace[name] is getattr(module, name)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from tier_middleware import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(tier_middleware.__all__)
