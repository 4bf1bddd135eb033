"""Route LLM calls by complexity tier inside any ASGI app."""

from ._config import ConfigError, ModelConfig, TierConfig
from ._health import HealthConfig, HealthTracker, ModelHealth
from ._middleware import TierRoutingMiddleware, current_selection
from ._router import NoHealthyModel, RoutingError, Selection, TierRouter, UnknownTier
from ._routes import RoutePolicy

__all__ = [
    "ConfigError",
    "HealthConfig",
    "HealthTracker",
    "ModelConfig",
    "ModelHealth",
    "NoHealthyModel",
    "RoutePolicy",
    "RoutingError",
    "Selection",
    "TierConfig",
    "TierRouter",
    "TierRoutingMiddleware",
    "UnknownTier",
    "current_selection",
]
