"""Choosing a concrete model for a tier: healthy ones only, cheaper ones more often."""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Collection
from dataclasses import dataclass
from itertools import accumulate

from ._config import ModelConfig, TierConfig
from ._health import HealthTracker, Key


class RoutingError(Exception):
    """Base class of the errors `TierRouter.select` raises."""


class UnknownTier(RoutingError):
    def __init__(self, tier: str, valid_tiers: tuple[str, ...]) -> None:
        self.tier = tier
        self.valid_tiers = valid_tiers
        shown = tier if len(tier) <= 64 else tier[:64] + "..."
        super().__init__(f"unknown tier {shown!r}; valid tiers: {', '.join(valid_tiers)}")


class NoHealthyModel(RoutingError):
    def __init__(self, tier: str, retry_after: float) -> None:
        self.tier = tier
        self.retry_after = retry_after
        super().__init__(f"no healthy model for tier {tier!r}; retry in {math.ceil(retry_after)} s")


@dataclass(frozen=True, slots=True)
class Selection:
    """The model chosen for one request."""

    tier: str
    provider: str
    model: str
    config: ModelConfig

    @property
    def key(self) -> Key:
        return (self.provider, self.model)


class _Pool:
    """The healthy models of one tier as ready-made selections with cumulative weights, valid
    while the health version is unchanged and the clock is before `valid_until`."""

    __slots__ = ("by_provider", "choices", "cumulative", "total", "valid_until", "version")

    def __init__(self, choices: list[Selection], version: int, valid_until: float) -> None:
        self.choices = choices
        self.cumulative = list(accumulate(c.config.effective_weight for c in choices))
        self.total = self.cumulative[-1] if choices else 0.0
        self.version = version
        self.valid_until = valid_until
        self.by_provider: dict[str, _Pool] | None = None  # built on the first preferred lookup

    def provider_pool(self, provider: str) -> _Pool | None:
        if self.by_provider is None:
            groups: dict[str, list[Selection]] = {}
            for c in self.choices:
                groups.setdefault(c.provider, []).append(c)
            self.by_provider = {
                name: _Pool(group, self.version, self.valid_until) for name, group in groups.items()
            }
        return self.by_provider.get(provider)

    def without(self, exclude: Collection[Key]) -> _Pool:
        kept = [c for c in self.choices if (c.provider, c.model) not in exclude]
        return _Pool(kept, self.version, self.valid_until)

    def draw(self, rng: random.Random) -> Selection:
        choices = self.choices
        if len(choices) == 1:
            return choices[0]
        index = bisect_right(self.cumulative, rng.random() * self.total)
        return choices[min(index, len(choices) - 1)]


class TierRouter:
    """Selects a (provider, model) for a tier.

    A preferred provider with a healthy model in the tier wins; otherwise a random draw weighted
    by each model's `weight` (default 1 / relative_cost). Models in backoff are skipped; a model
    whose backoff has ended takes part as a half-open probe.
    """

    def __init__(
        self,
        config: TierConfig,
        health: HealthTracker | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.health = health or HealthTracker()
        self._rng = rng or random.Random()
        self._pools: dict[str, _Pool] = {}
        self.config = config

    @property
    def config(self) -> TierConfig:
        return self._config

    @config.setter
    def config(self, config: TierConfig) -> None:
        """Swap the routing table; health state of models that remain is kept."""
        self._config = config
        self._ranks = config.ranks
        self._pools = {}

    async def select(
        self,
        tier: str,
        *,
        preferred_provider: str | None = None,
        exclude: Collection[Key] = (),
    ) -> Selection:
        return self.select_now(tier, preferred_provider=preferred_provider, exclude=exclude)

    def select_now(
        self,
        tier: str,
        *,
        preferred_provider: str | None = None,
        exclude: Collection[Key] = (),
    ) -> Selection:
        """`select` without the coroutine, for callers that are not async."""
        if tier not in self._ranks:
            raise UnknownTier(tier, self._config.tier_order)
        health = self.health
        for _ in range(3):  # a half-open probe slot can be taken between two draws
            pool = self._pools.get(tier)
            if pool is None or pool.version != health.version or health.clock() >= pool.valid_until:
                pool = self._pools[tier] = self._build(tier)
            if exclude:
                pool = pool.without(exclude)
            if not pool.choices:
                raise NoHealthyModel(tier, self._retry_after(tier, exclude))
            chosen_pool = pool
            if preferred_provider is not None:
                chosen_pool = pool.provider_pool(preferred_provider) or pool
            chosen = chosen_pool.draw(self._rng)
            if health.acquire(chosen.provider, chosen.model):
                return chosen
        raise NoHealthyModel(tier, self._retry_after(tier, exclude))

    def probabilities(self, tier: str) -> dict[Key, float]:
        """The chance of each model of `tier` being drawn now (0 for those in backoff)."""
        if tier not in self._ranks:
            raise UnknownTier(tier, self._config.tier_order)
        pool = self._build(tier)
        weights = {c.key: c.config.effective_weight / pool.total for c in pool.choices}
        return {m.key: weights.get(m.key, 0.0) for m in self._config.models(tier)}

    def _build(self, tier: str) -> _Pool:
        health = self.health
        version = health.version
        valid_until = math.inf
        healthy = []
        for m in self._config.models(tier):
            available, change_at = health.availability(m.provider, m.model)
            if available:
                healthy.append(Selection(tier, m.provider, m.model, m))
            valid_until = min(valid_until, change_at)
        return _Pool(healthy, version, valid_until)

    def _retry_after(self, tier: str, exclude: Collection[Key]) -> float:
        remaining = [
            r
            for m in self._config.models(tier)
            if (r := self.health.backoff_remaining(m.provider, m.model)) is not None
            and m.key not in exclude
        ]
        # Only excluded models (or probes in flight) stand in the way: suggest the smallest wait.
        return min(remaining, default=0.0)
