"""Which paths are routed, and by what policy."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ._config import ConfigError, TierConfig, normalize_tier


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """How one opted-in route treats tiers.

    `default_tier` applies when a request names none; `allowed_tiers` limits what a request may
    ask for (403 otherwise); `require_tier` answers 400 to a request without a tier; a failed
    call is retried on another model until `max_attempts` calls were made.
    """

    default_tier: str | None = None
    allowed_tiers: frozenset[str] | None = None
    require_tier: bool = False
    max_attempts: int = 2

    def __init__(
        self,
        default_tier: str | None = None,
        allowed_tiers: Iterable[str] | None = None,
        require_tier: bool = False,
        max_attempts: int = 2,
    ) -> None:
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(
                f"RoutePolicy.max_attempts must be an integer >= 1, got {max_attempts!r}"
            )
        if isinstance(allowed_tiers, str):
            raise TypeError("RoutePolicy.allowed_tiers takes a collection of tier names, not a str")
        allowed = (
            frozenset(normalize_tier(t) for t in allowed_tiers)
            if allowed_tiers is not None
            else None
        )
        default = normalize_tier(default_tier) if default_tier is not None else None
        if default is not None and allowed is not None and default not in allowed:
            raise ValueError(f"RoutePolicy.default_tier {default!r} is not in allowed_tiers")
        object.__setattr__(self, "default_tier", default)
        object.__setattr__(self, "allowed_tiers", allowed)
        object.__setattr__(self, "require_tier", bool(require_tier))
        object.__setattr__(self, "max_attempts", max_attempts)

    def check_against(self, config: TierConfig) -> None:
        """Raise ConfigError when the policy names a tier the config does not have."""
        named = set(self.allowed_tiers or ()) | (
            {self.default_tier} if self.default_tier else set()
        )
        unknown = sorted(t for t in named if t not in config)
        if unknown:
            raise ConfigError(
                f"route policy names unknown tier(s) {unknown}; valid tiers: "
                f"{', '.join(config.tier_order)}"
            )


Routes = Sequence[str] | Mapping[str, RoutePolicy] | None


class RouteTable:
    """Matches a request path to its policy: exact patterns by dict lookup, then `*` patterns
    (one path segment each) in the order given."""

    def __init__(self, routes: Routes) -> None:
        self.match_all: RoutePolicy | None = None
        self.explicit = routes is not None
        self._exact: dict[str, RoutePolicy] = {}
        self._wild: list[tuple[re.Pattern[str], RoutePolicy]] = []
        if routes is None:
            self.match_all = RoutePolicy()
            return
        if isinstance(routes, str):
            raise TypeError("routes takes a list of path patterns or a mapping, not a str")
        items = (
            routes.items() if isinstance(routes, Mapping) else ((p, RoutePolicy()) for p in routes)
        )
        for pattern, policy in items:
            if not isinstance(pattern, str) or not pattern.startswith("/"):
                raise ValueError(f"route pattern {pattern!r} must be a path starting with '/'")
            if not isinstance(policy, RoutePolicy):
                raise TypeError(
                    f"route {pattern!r}: expected a RoutePolicy, got {type(policy).__name__}"
                )
            if "*" in pattern:
                parts = (("[^/]+" if seg == "*" else re.escape(seg)) for seg in pattern.split("/"))
                self._wild.append((re.compile("/".join(parts) + r"\Z"), policy))
            else:
                self._exact[pattern] = policy

    def policies(self) -> list[RoutePolicy]:
        found = [*self._exact.values(), *(p for _, p in self._wild)]
        return found + ([self.match_all] if self.match_all else [])

    def match(self, path: str) -> RoutePolicy | None:
        if self.match_all is not None:
            return self.match_all
        policy = self._exact.get(path)
        if policy is not None:
            return policy
        for regex, policy in self._wild:
            if regex.match(path):
                return policy
        return None
