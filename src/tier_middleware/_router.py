"""Choosing a concrete model for a tier: healthy ones only, cheaper ones more often."""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from itertools import accumulate

from ._config import ModelConfig, TierConfig
from ._errors import NoHealthyModelError, UnknownTierError
from ._health import PROBE, HealthTracker, Key

ProbeLease = Callable[[str, str], Awaitable[bool]]
_NEVER = math.inf


@dataclass(frozen=True, slots=True)
class Selection:
    """The model chosen for one request."""

    tier: str
    provider: str
    model: str
    config: ModelConfig
    # Derived once, since a selection is reused by every request it serves; the metric labels
    # and response headers are the middleware's caches, not part of the public value.
    key: Key = field(init=False, repr=False, compare=False)
    _labels: tuple[str, str, str] = field(init=False, repr=False, compare=False)
    _headers: tuple[tuple[bytes, bytes], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "key", (self.provider, self.model))
        set_(self, "_labels", (self.tier, self.provider, self.model))
        set_(
            self,
            "_headers",
            (
                (b"x-tier", self.tier.encode()),
                (b"x-tier-provider", self.provider.encode()),
                (b"x-tier-model", self.model.encode()),
            ),
        )


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

    def pick(self, rng: random.Random, exclude: Collection[Key]) -> Selection | None:
        """A weighted draw among the choices not in `exclude` (None if that leaves none).

        Redrawing on an excluded pick samples exactly the renormalised weights, without
        rebuilding anything; only a pool that is mostly excluded is filtered.
        """
        if not exclude:
            return self.draw(rng)
        for _ in range(8):
            chosen = self.draw(rng)
            if chosen.key not in exclude:
                return chosen
        kept = [c for c in self.choices if c.key not in exclude]
        return _Pool(kept, self.version, self.valid_until).draw(rng) if kept else None

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
        probe_lease: ProbeLease | None = None,
    ) -> None:
        self.health = health or HealthTracker()
        self._rng = rng or random.Random()
        # Asked before a half-open probe goes out; False means another instance is probing.
        self._probe_lease = probe_lease
        # Whether a half-open probe also needs the fleet-wide lease (shared health).
        self.leases_probes = probe_lease is not None
        self._pools: dict[str, _Pool] = {}
        self.config = config

    @property
    def config(self) -> TierConfig:
        return self._config

    @config.setter
    def config(self, config: TierConfig) -> None:
        """Swap the routing table; health state of models that remain is kept."""
        self._config = config
        self._ranks = self.ranks = config.ranks  # tier -> position, for a cheap `in` check
        self._pools = {}
        self._pinned = {
            tier: {m.key: Selection(tier, m.provider, m.model, m) for m in models}
            for tier, models in config.tiers.items()
        }

    async def select(
        self,
        tier: str,
        *,
        preferred_provider: str | None = None,
        exclude: Collection[Key] = (),
    ) -> Selection:
        for _ in range(3):  # a probe slot or lease can be taken between two draws
            chosen, granted = self._draw(tier, preferred_provider, exclude)
            if (
                granted == PROBE
                and self._probe_lease is not None
                and not await self._probe_lease(chosen.provider, chosen.model)
            ):
                continue  # another instance probes it; our slot stays taken meanwhile
            if granted:
                return chosen
        raise NoHealthyModelError(tier, self._retry_after(tier, exclude))

    def select_now(
        self,
        tier: str,
        *,
        preferred_provider: str | None = None,
        exclude: Collection[Key] = (),
    ) -> Selection:
        """`select` without the coroutine (and without a fleet-wide probe lease)."""
        for _ in range(3):
            chosen, granted = self._draw(tier, preferred_provider, exclude)
            if granted:
                return chosen
        raise NoHealthyModelError(tier, self._retry_after(tier, exclude))

    async def pin(self, tier: str, provider: str, model: str) -> Selection | None:
        """The selection of exactly this model when it serves `tier` and may take a request."""
        chosen = self._pinned.get(tier, {}).get((provider, model))
        if chosen is None:
            return None
        granted = self.health._grant(provider, model)
        if granted == PROBE and self._probe_lease is not None:
            return chosen if await self._probe_lease(provider, model) else None
        return chosen if granted else None

    def _draw(
        self, tier: str, preferred_provider: str | None, exclude: Collection[Key]
    ) -> tuple[Selection, int]:
        if tier not in self._ranks:
            raise UnknownTierError(tier, self._config.tier_order)
        health = self.health
        pool = self._pools.get(tier)
        if (
            pool is None
            or pool.version != health.version
            # Most pools never expire (no model with a pending change): no clock read for them.
            or (pool.valid_until != _NEVER and health.clock() >= pool.valid_until)
        ):
            pool = self._pools[tier] = self._build(tier)
        if not pool.choices:
            raise NoHealthyModelError(tier, self._retry_after(tier, exclude))
        chosen = None
        if preferred_provider is not None:
            preferred = pool.provider_pool(preferred_provider)
            if preferred is not None:
                chosen = preferred.pick(self._rng, exclude)
        if chosen is None:
            chosen = pool.pick(self._rng, exclude) if exclude else pool.draw(self._rng)
            if chosen is None:
                raise NoHealthyModelError(tier, self._retry_after(tier, exclude))
        return chosen, health._grant(chosen.provider, chosen.model)

    def probabilities(self, tier: str) -> dict[Key, float]:
        """The chance of each model of `tier` being drawn now (0 for those in backoff)."""
        if tier not in self._ranks:
            raise UnknownTierError(tier, self._config.tier_order)
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

    def unavailable_for(self, tier: str) -> float | None:
        """Seconds until a model of `tier` may take a request again, when none may now; None
        while one may."""
        now = self.health.clock()
        waits = []
        for m in self._config.models(tier):
            available, change_at = self.health.availability(m.provider, m.model)
            if available:
                return None
            waits.append(max(0.0, change_at - now))
        return min(waits, default=None)

    def _retry_after(self, tier: str, exclude: Collection[Key]) -> float:
        """Seconds until a model of the tier (not excluded) may take a request again: the end
        of a backoff, or of a half-open probe's timeout."""
        now = self.health.clock()
        waits = []
        for m in self._config.models(tier):
            if m.key in exclude:
                continue
            available, change_at = self.health.availability(m.provider, m.model)
            if not available:
                waits.append(max(0.0, change_at - now))
        return min(waits, default=0.0)
