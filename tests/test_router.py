"""TierRouter: healthy-only, preferred provider, exclusion, errors, pool caching and config swaps."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from _clock import FakeClock
from configs import entry
from tier_middleware import (
    HealthConfig,
    HealthTracker,
    NoHealthyModel,
    RoutingError,
    Selection,
    TierConfig,
    TierRouter,
    UnknownTier,
)


def config(simple: list[dict[str, Any]], **extra_tiers: list[dict[str, Any]]) -> TierConfig:
    tiers = {
        "simple": simple,
        "moderate": [entry("openai", "gpt-4o", 5)],
        "complex": [entry("anthropic", "claude-opus", 20)],
        **extra_tiers,
    }
    return TierConfig.load({"tiers": tiers})


SIMPLE = [
    entry("openai", "gpt-4o-mini", 1),
    entry("google", "gemini-flash", 2),
    entry("anthropic", "claude-haiku", 4),
]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def health(clock: FakeClock) -> HealthTracker:
    return HealthTracker(clock=clock)


def make_router(cfg: TierConfig, health: HealthTracker, seed: int = 0) -> TierRouter:
    return TierRouter(cfg, health, rng=random.Random(seed))


def draw_keys(router: TierRouter, tier: str, n: int, **kwargs: Any) -> Counter[tuple[str, str]]:
    return Counter(router.select_now(tier, **kwargs).key for _ in range(n))


# -- basics -------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_select_returns_a_selection_of_the_tier(health: HealthTracker) -> None:
    cfg = config(SIMPLE)
    router = make_router(cfg, health)
    chosen = await router.select("moderate")
    assert chosen == Selection("moderate", "openai", "gpt-4o", cfg.models("moderate")[0])
    assert chosen.config is cfg.models("moderate")[0]
    assert chosen.key == ("openai", "gpt-4o")


@pytest.mark.anyio
async def test_select_and_select_now_agree_for_the_same_seed(health: HealthTracker) -> None:
    cfg = config(SIMPLE)
    a = make_router(cfg, health, seed=3)
    b = make_router(cfg, health, seed=3)
    async_keys = [(await a.select("simple")).key for _ in range(50)]
    sync_keys = [b.select_now("simple").key for _ in range(50)]
    assert async_keys == sync_keys


def test_default_health_tracker_is_created() -> None:
    router = TierRouter(config(SIMPLE))
    assert isinstance(router.health, HealthTracker)
    assert router.select_now("simple").tier == "simple"


def test_all_models_of_a_tier_get_drawn(health: HealthTracker) -> None:
    counts = draw_keys(make_router(config(SIMPLE), health), "simple", 2000)
    assert set(counts) == {(m["provider"], m["model"]) for m in SIMPLE}
    # cheaper is drawn more often: weights 1, 1/2, 1/4
    assert (
        counts[("openai", "gpt-4o-mini")]
        > counts[("google", "gemini-flash")]
        > counts[("anthropic", "claude-haiku")]
    )


def test_explicit_weight_overrides_cost(health: HealthTracker) -> None:
    cfg = config([entry("openai", "cheap", 1), entry("openai", "pricey", 100, weight=50.0)])
    counts = draw_keys(make_router(cfg, health), "simple", 1000)
    assert counts[("openai", "pricey")] > 900


def test_rng_makes_draws_reproducible(health: HealthTracker) -> None:
    cfg = config(SIMPLE)

    def sequence(seed: int) -> list[tuple[str, str]]:
        router = make_router(cfg, health, seed=seed)
        return [router.select_now("simple").key for _ in range(40)]

    assert sequence(11) == sequence(11)
    assert sequence(11) != sequence(12)


# -- unknown tier / no healthy model ------------------------------------------------------------


@pytest.mark.anyio
async def test_unknown_tier(health: HealthTracker) -> None:
    router = make_router(config(SIMPLE), health)
    with pytest.raises(UnknownTier) as info:
        await router.select("premium")
    err = info.value
    assert isinstance(err, RoutingError)
    assert err.tier == "premium"
    assert err.valid_tiers == ("simple", "moderate", "complex")
    assert str(err) == "unknown tier 'premium'; valid tiers: simple, moderate, complex"


def test_unknown_tier_is_not_normalized_silently(health: HealthTracker) -> None:
    router = make_router(config(SIMPLE), health)
    with pytest.raises(UnknownTier):
        router.select_now("")
    with pytest.raises(UnknownTier) as info:
        router.select_now("x" * 1000)
    assert len(str(info.value)) < 200  # a huge tier name is shortened in the message
    assert info.value.tier == "x" * 1000


def test_unknown_tier_in_probabilities(health: HealthTracker) -> None:
    router = make_router(config(SIMPLE), health)
    with pytest.raises(UnknownTier):
        router.probabilities("premium")


@pytest.mark.anyio
async def test_no_healthy_model_reports_shortest_backoff(
    health: HealthTracker, clock: FakeClock
) -> None:
    router = make_router(config(SIMPLE), health)
    health.record_failure("openai", "gpt-4o-mini", retry_after=90)
    health.record_failure("google", "gemini-flash")  # 30 s
    health.record_failure("anthropic", "claude-haiku", retry_after=45)
    clock.advance(10)
    with pytest.raises(NoHealthyModel) as info:
        await router.select("simple")
    err = info.value
    assert isinstance(err, RoutingError)
    assert err.tier == "simple"
    assert err.retry_after == pytest.approx(20.0)
    assert "retry in 20 s" in str(err)
    # Other tiers are unaffected.
    assert (await router.select("moderate")).model == "gpt-4o"


def test_no_healthy_model_ignores_backoffs_of_other_tiers(
    health: HealthTracker, clock: FakeClock
) -> None:
    router = make_router(config([entry("openai", "only")]), health)
    health.record_failure("openai", "gpt-4o")  # moderate tier, 30 s
    health.record_failure("openai", "only", retry_after=200)
    with pytest.raises(NoHealthyModel) as info:
        router.select_now("simple")
    assert info.value.retry_after == pytest.approx(200.0)


# -- health awareness ---------------------------------------------------------------------------


def test_models_in_backoff_are_never_selected(health: HealthTracker) -> None:
    router = make_router(config(SIMPLE), health)
    health.record_failure("openai", "gpt-4o-mini")
    counts = draw_keys(router, "simple", 500)
    assert ("openai", "gpt-4o-mini") not in counts
    assert set(counts) == {("google", "gemini-flash"), ("anthropic", "claude-haiku")}


def test_failure_after_caching_takes_effect_immediately(health: HealthTracker) -> None:
    router = make_router(config(SIMPLE), health)
    draw_keys(router, "simple", 50)  # the pool is now cached
    health.record_failure("google", "gemini-flash")
    assert ("google", "gemini-flash") not in draw_keys(router, "simple", 500)


def test_failures_below_threshold_keep_the_model(clock: FakeClock) -> None:
    health = HealthTracker(HealthConfig(failure_threshold=2), clock=clock)
    router = make_router(config([entry("openai", "m")]), health)
    health.record_failure("openai", "m")
    assert router.select_now("simple").key == ("openai", "m")


def test_expired_backoff_is_selectable_again_without_any_event(
    health: HealthTracker, clock: FakeClock
) -> None:
    cfg = config([entry("openai", "a", weight=1000.0), entry("openai", "b")])
    router = make_router(cfg, health)
    health.record_failure("openai", "a")
    assert ("openai", "a") not in draw_keys(router, "simple", 200)  # pool cached without "a"
    version = health.version
    clock.advance(29.9)
    assert ("openai", "a") not in draw_keys(router, "simple", 200)
    clock.advance(0.1)
    assert health.version == version  # nothing happened but time passing
    assert router.select_now("simple").key == ("openai", "a")


def test_success_after_caching_restores_the_model(health: HealthTracker) -> None:
    router = make_router(config([entry("openai", "a"), entry("openai", "b")]), health)
    health.record_failure("openai", "a")
    draw_keys(router, "simple", 20)
    health.record_success("openai", "a")
    assert ("openai", "a") in draw_keys(router, "simple", 200)


def half_open_a(health: HealthTracker, clock: FakeClock) -> TierRouter:
    """A router on "a" and "b" where "a" failed once and its 30 s backoff has just run out, so
    it is half-open. "a" would win almost every draw, so any extra probe would show up."""
    router = make_router(
        config([entry("openai", "a", weight=1000.0), entry("openai", "b")]), health
    )
    health.record_failure("openai", "a")
    clock.advance(30)
    return router


def test_half_open_probe_gets_one_request_until_an_outcome(
    health: HealthTracker, clock: FakeClock
) -> None:
    router = half_open_a(health, clock)
    assert draw_keys(router, "simple", 300)[("openai", "a")] == 1
    health.release("openai", "a")  # neutral outcome: one more probe allowed
    assert draw_keys(router, "simple", 300)[("openai", "a")] == 1
    health.record_success("openai", "a")
    assert draw_keys(router, "simple", 300)[("openai", "a")] > 250


def test_several_half_open_probes(clock: FakeClock) -> None:
    router = half_open_a(HealthTracker(HealthConfig(half_open_probes=3), clock=clock), clock)
    assert draw_keys(router, "simple", 300)[("openai", "a")] == 3


def test_lost_probe_is_forgotten_after_probe_timeout(
    health: HealthTracker, clock: FakeClock
) -> None:
    router = half_open_a(health, clock)
    assert draw_keys(router, "simple", 100)[("openai", "a")] == 1
    clock.advance(59)
    assert ("openai", "a") not in draw_keys(router, "simple", 100)
    clock.advance(1)  # probe_timeout (60 s) passed: no event needed
    assert draw_keys(router, "simple", 100)[("openai", "a")] == 1


def test_single_model_tier_with_probe_in_flight(health: HealthTracker, clock: FakeClock) -> None:
    router = make_router(config([entry("openai", "only")]), health)
    health.record_failure("openai", "only")
    clock.advance(30)
    assert router.select_now("simple").key == ("openai", "only")
    with pytest.raises(NoHealthyModel) as info:
        router.select_now("simple")
    assert info.value.tier == "simple"


# -- preferred provider -------------------------------------------------------------------------


def test_preferred_provider_wins_even_when_expensive(health: HealthTracker) -> None:
    router = make_router(config(SIMPLE), health)
    counts = draw_keys(router, "simple", 300, preferred_provider="anthropic")
    assert counts == Counter({("anthropic", "claude-haiku"): 300})


def test_preferred_provider_with_several_models_draws_among_them(health: HealthTracker) -> None:
    cfg = config([entry("openai", "a", 1), entry("openai", "b", 3), entry("google", "g", 1)])
    router = make_router(cfg, health)
    counts = draw_keys(router, "simple", 2000, preferred_provider="openai")
    assert set(counts) == {("openai", "a"), ("openai", "b")}
    assert counts[("openai", "a")] > 2 * counts[("openai", "b")]  # expected ratio 3:1


def test_preferred_provider_in_backoff_falls_back(health: HealthTracker) -> None:
    router = make_router(config(SIMPLE), health)
    health.record_failure("anthropic", "claude-haiku")
    counts = draw_keys(router, "simple", 300, preferred_provider="anthropic")
    assert ("anthropic", "claude-haiku") not in counts
    assert len(counts) == 2


def test_preferred_provider_not_in_tier_falls_back(health: HealthTracker) -> None:
    router = make_router(config(SIMPLE), health)
    counts = draw_keys(router, "simple", 1000, preferred_provider="mistral")
    assert len(counts) == 3


def test_preferred_provider_pool_follows_health_changes(health: HealthTracker) -> None:
    router = make_router(config(SIMPLE), health)
    assert router.select_now("simple", preferred_provider="google").provider == "google"
    health.record_failure("google", "gemini-flash")
    assert router.select_now("simple", preferred_provider="google").provider != "google"
    health.record_success("google", "gemini-flash")
    assert router.select_now("simple", preferred_provider="google").provider == "google"


# -- exclude ------------------------------------------------------------------------------------


def test_exclude_distinguishes_providers_serving_the_same_model_name(
    health: HealthTracker,
) -> None:
    router = make_router(config([entry("openai", "m"), entry("azure", "m")]), health)
    counts = draw_keys(router, "simple", 300, exclude=[("openai", "m")])
    assert counts == Counter({("azure", "m"): 300})


@pytest.mark.parametrize("container", [list, tuple, set, frozenset])
def test_exclude_accepts_any_collection(health: HealthTracker, container: type) -> None:
    router = make_router(config(SIMPLE), health)
    exclude = container([("openai", "gpt-4o-mini"), ("google", "gemini-flash")])
    counts = draw_keys(router, "simple", 100, exclude=exclude)
    assert counts == Counter({("anthropic", "claude-haiku"): 100})


def test_exclude_beats_preferred_provider(health: HealthTracker) -> None:
    router = make_router(config(SIMPLE), health)
    counts = draw_keys(
        router, "simple", 300, preferred_provider="openai", exclude={("openai", "gpt-4o-mini")}
    )
    assert ("openai", "gpt-4o-mini") not in counts


def test_exclude_does_not_poison_the_cache(health: HealthTracker) -> None:
    router = make_router(config(SIMPLE), health)
    router.select_now("simple", exclude={("openai", "gpt-4o-mini")})
    assert ("openai", "gpt-4o-mini") in draw_keys(router, "simple", 200)


def test_retry_chain_never_repeats_a_pair(health: HealthTracker) -> None:
    router = make_router(config(SIMPLE), health, seed=99)
    tried: list[tuple[str, str]] = []
    for _ in range(3):
        tried.append(router.select_now("simple", exclude=tried).key)
    assert sorted(tried) == sorted((m["provider"], m["model"]) for m in SIMPLE)
    with pytest.raises(NoHealthyModel) as info:
        router.select_now("simple", exclude=tried)
    assert info.value.retry_after == 0.0  # only exclusions stand in the way


def test_no_healthy_model_with_exclusions_uses_remaining_backoffs(
    health: HealthTracker, clock: FakeClock
) -> None:
    router = make_router(config([entry("openai", "a"), entry("azure", "a")]), health)
    health.record_failure("azure", "a", retry_after=100)
    health.record_failure("openai", "a")  # 30 s, but excluded anyway
    with pytest.raises(NoHealthyModel) as info:
        router.select_now("simple", exclude=[("openai", "a")])
    assert info.value.retry_after == pytest.approx(100.0)


# -- probabilities ------------------------------------------------------------------------------


def test_probabilities_follow_inverse_cost(health: HealthTracker) -> None:
    probs = make_router(config(SIMPLE), health).probabilities("simple")
    assert probs == {
        ("openai", "gpt-4o-mini"): pytest.approx(4 / 7),
        ("google", "gemini-flash"): pytest.approx(2 / 7),
        ("anthropic", "claude-haiku"): pytest.approx(1 / 7),
    }


def test_probabilities_use_weight_override(health: HealthTracker) -> None:
    cfg = config([entry("openai", "a", 1), entry("openai", "b", 100, weight=3.0)])
    probs = make_router(cfg, health).probabilities("simple")
    assert probs == {("openai", "a"): pytest.approx(0.25), ("openai", "b"): pytest.approx(0.75)}


def test_probabilities_zero_in_backoff_and_back_after(
    health: HealthTracker, clock: FakeClock
) -> None:
    router = make_router(config(SIMPLE), health)
    health.record_failure("openai", "gpt-4o-mini")
    probs = router.probabilities("simple")
    assert probs[("openai", "gpt-4o-mini")] == 0.0
    assert probs[("google", "gemini-flash")] == pytest.approx(2 / 3)
    assert probs[("anthropic", "claude-haiku")] == pytest.approx(1 / 3)
    clock.advance(30)
    assert router.probabilities("simple")[("openai", "gpt-4o-mini")] == pytest.approx(4 / 7)


def test_probabilities_all_in_backoff(health: HealthTracker) -> None:
    router = make_router(config([entry("openai", "a"), entry("azure", "a")]), health)
    health.record_failure("openai", "a")
    health.record_failure("azure", "a")
    assert router.probabilities("simple") == {("openai", "a"): 0.0, ("azure", "a"): 0.0}


# -- caching ------------------------------------------------------------------------------------


class CountingHealth(HealthTracker):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.lookups = 0

    def availability(self, provider: str, model: str) -> tuple[bool, float]:
        self.lookups += 1
        return super().availability(provider, model)


def test_pool_is_cached_until_health_changes(clock: FakeClock) -> None:
    health = CountingHealth(clock)
    many = [entry("openai", f"m{i}") for i in range(50)]
    router = make_router(config(many), health)
    router.select_now("simple")
    assert health.lookups == 50
    for _ in range(200):
        router.select_now("simple")
        router.select_now("simple", preferred_provider="openai")
        router.select_now("simple", exclude=[("openai", "m0")])
    assert health.lookups == 50  # no per-request work proportional to the tier size
    health.record_failure("openai", "m7")
    router.select_now("simple")
    assert health.lookups == 100
    clock.advance(29)
    router.select_now("simple")
    assert health.lookups == 100  # still inside the backoff: cache holds
    clock.advance(1)
    router.select_now("simple")
    assert health.lookups == 150  # backoff ended: rebuilt by time alone


def test_pools_are_per_tier(clock: FakeClock) -> None:
    health = CountingHealth(clock)
    router = make_router(config(SIMPLE), health)
    router.select_now("simple")
    router.select_now("moderate")
    lookups = health.lookups
    for _ in range(20):
        router.select_now("simple")
        router.select_now("moderate")
    assert health.lookups == lookups == 4


# -- config swap --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_config_swap_changes_tiers_and_keeps_health(
    health: HealthTracker, clock: FakeClock
) -> None:
    router = make_router(config(SIMPLE), health)
    health.record_failure("openai", "gpt-4o-mini")
    await router.select("simple")  # cache the old pools

    new = TierConfig.load(
        {
            "tiers": {
                "fast": [entry("openai", "gpt-4o-mini"), entry("mistral", "small", 3)],
                "smart": [entry("openai", "gpt-4o")],
            },
            "tierOrder": ["fast", "smart"],
        }
    )
    router.config = new
    assert router.config is new
    assert router.health is health

    with pytest.raises(UnknownTier) as info:
        await router.select("simple")
    assert info.value.valid_tiers == ("fast", "smart")

    # openai/gpt-4o-mini is still backed off after the swap.
    keys = {(await router.select("fast")).key for _ in range(100)}
    assert keys == {("mistral", "small")}
    assert router.probabilities("fast") == {
        ("openai", "gpt-4o-mini"): 0.0,
        ("mistral", "small"): 1.0,
    }
    clock.advance(30)
    assert ("openai", "gpt-4o-mini") in {(await router.select("fast")).key for _ in range(100)}


def test_config_swap_drops_cached_pools(health: HealthTracker) -> None:
    router = make_router(config([entry("openai", "old")]), health)
    assert router.select_now("simple").model == "old"
    router.config = config([entry("openai", "new")])
    assert router.select_now("simple").model == "new"
    assert router.select_now("simple").config.model == "new"
