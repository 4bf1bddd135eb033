"""Route LLM calls by complexity tier inside any ASGI app."""

from ._attempt import current_selection
from ._config import ConfigError, ModelConfig, ProviderConfig, TierConfig
from ._control_plane import ControlPlaneSource
from ._health import HealthConfig, HealthTracker, ModelHealth
from ._metrics import metrics_app
from ._middleware import TierRoutingMiddleware
from ._router import NoHealthyModel, RoutingError, Selection, TierRouter, UnknownTier
from ._routes import RoutePolicy
from ._status import status_app
from ._upstream import UpstreamTransport

__all__ = [
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
