"""Route LLM calls by complexity tier inside any ASGI app."""

from ._config import ConfigError, ModelConfig, TierConfig
from ._health import HealthConfig, HealthTracker, ModelHealth
from ._router import NoHealthyModel, RoutingError, Selection, TierRouter, UnknownTier

__all__ = [
    "ConfigError",
    "HealthConfig",
    "HealthTracker",
    "ModelConfig",
    "ModelHealth",
    "NoHealthyModel",
    "RoutingError",
    "Selection",
    "TierConfig",
    "TierRouter",
    "UnknownTier",
]
