"""Route LLM calls by complexity tier inside any ASGI app."""

from ._config import ConfigError, ModelConfig, TierConfig
from ._health import HealthConfig, HealthTracker, ModelHealth
from ._metrics import metrics_app
from ._middleware import TierRoutingMiddleware, current_selection
from ._router import NoHealthyModel, RoutingError, Selection, TierRouter, UnknownTier
from ._routes import RoutePolicy
from ._sources import ControlPlaneSource
from ._status import status_app

__all__ = [
    "ConfigError",
    "ControlPlaneSource",
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
    "metrics_app",
    "status_app",
]
