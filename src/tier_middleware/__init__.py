"""Route LLM calls by complexity tier inside any ASGI app."""

from ._attempt import current_selection
from ._config import ModelConfig, ProviderConfig, StaticConfig, TierConfig
from ._config_manager import ConfigSource
from ._control_plane import ControlPlaneSource, FetchError
from ._errors import (
    ConfigError,
    NoHealthyModel,
    NoHealthyModelError,
    RoutingError,
    TierMiddlewareError,
    UnknownTier,
    UnknownTierError,
)
from ._health import HealthConfig, HealthTracker, ModelHealth
from ._metrics import metrics_app
from ._middleware import TierRoutingMiddleware
from ._options import RequestLimits, RetryConfig, SessionConfig
from ._router import Selection, TierRouter
from ._routes import RoutePolicy, Routes
from ._sessions import Identity
from ._status import StatusSource, status_app
from ._types import Authorize
from ._upstream import UpstreamTransport
from ._version import __version__

__all__ = [
    "Authorize",
    "ConfigError",
    "ConfigSource",
    "ControlPlaneSource",
    "FetchError",
    "HealthConfig",
    "HealthTracker",
    "Identity",
    "ModelConfig",
    "ModelHealth",
    "NoHealthyModel",
    "NoHealthyModelError",
    "ProviderConfig",
    "RequestLimits",
    "RetryConfig",
    "RoutePolicy",
    "Routes",
    "RoutingError",
    "Selection",
    "SessionConfig",
    "StaticConfig",
    "StatusSource",
    "TierConfig",
    "TierMiddlewareError",
    "TierRouter",
    "TierRoutingMiddleware",
    "UnknownTier",
    "UnknownTierError",
    "UpstreamTransport",
    "__version__",
    "current_selection",
    "metrics_app",
    "status_app",
]
