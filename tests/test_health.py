"""HealthTracker: backoff, reset, jitter, retry-after, failure threshold and half-open probes.

Time only moves through the injected FakeClock; nothing here sleeps.
"""

from __future__ import annotations

import random
import time

import pytest

from _clock import FakeClock
from tier_middleware import HealthConfig, HealthTracker, ModelHealth
from tier_middleware._health import MAX_RETRY_AFTER


def tracker(clock: FakeClock, **config: float) -> HealthTracker:
    return HealthTracker(HealthConfig(**config), clock=clock)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- the seed's eight tests ---------------------------------------------------------------------


def test_new_provider_is_available(clock: FakeClock) -> None:
    health = HealthTracker(clock=clock)
    assert health.is_available("openai", "gpt-4o")
    assert health.backoff_remaining("openai", "gpt-4o") is None
    assert health.unavailable() == []


def test_failure_marks_unavailable(clock: FakeClock) -> None:
    health = HealthTracker(clock=clock)
    assert health.record_failure("openai", "gpt-4o") == 30.0
    assert not health.is_available("openai", "gpt-4o")
    assert health.backoff_remaining("openai", "gpt-4o") == 30.0


def test_success_resets(clock: FakeClock) -> None:
    health = HealthTracker(clock=clock)
    for _ in range(3):
        health.record_failure("openai", "gpt-4o")
    health.record_success("openai", "gpt-4o")
    assert health.is_available("openai", "gpt-4o")
    assert health.backoff_remaining("openai", "gpt-4o") is None
    assert health.unavailable() == []
    # The failure count is gone too: the next failure starts again at the initial backoff.
    assert health.record_failure("openai", "gpt-4o") == 30.0


def test_backoff_elapsed_makes_available(clock: FakeClock) -> None:
    health = HealthTracker(HealthConfig(initial_backoff=10.0), clock=clock)
    health.record_failure("openai", "gpt-4o")
    clock.advance(9.999)
    assert not health.is_available("openai", "gpt-4o")
    assert health.backoff_remaining("openai", "gpt-4o") == pytest.approx(0.001)
    clock.advance(0.001)
    assert health.is_available("openai", "gpt-4o")


def test_exponential_backoff_increases(clock: FakeClock) -> None:
    health = HealthTracker(HealthConfig(initial_backoff=10.0), clock=clock)
    assert health.record_failure("openai", "gpt-4o") == 10.0
    assert health.backoff_remaining("openai", "gpt-4o") == 10.0
    assert health.record_failure("openai", "gpt-4o") == 20.0
    assert health.backoff_remaining("openai", "gpt-4o") == 20.0


def test_backoff_capped_at_max(clock: FakeClock) -> None:
    health = HealthTracker(HealthConfig(initial_backoff=10.0, max_backoff=25.0), clock=clock)
    backoffs = [health.record_failure("openai", "gpt-4o") for _ in range(5)]
    assert backoffs == [10.0, 20.0, 25.0, 25.0, 25.0]
    assert health.backoff_remaining("openai", "gpt-4o") == 25.0


def test_different_providers_and_models_tracked_separately(clock: FakeClock) -> None:
    health = HealthTracker(clock=clock)
    health.record_failure("openai", "gpt-4o")
    assert not health.is_available("openai", "gpt-4o")
    assert health.is_available("openai", "gpt-4o-mini")
    assert health.is_available("azure", "gpt-4o")
    health.record_success("azure", "gpt-4o")
    assert not health.is_available("openai", "gpt-4o")


def test_unavailable_lists_consecutive_failures(clock: FakeClock) -> None:
    health = HealthTracker(clock=clock)
    health.record_failure("openai", "gpt-4o")
    health.record_failure("openai", "gpt-4o")
    assert health.unavailable() == [("openai", "gpt-4o", 2)]


# -- backoff sequence ---------------------------------------------------------------------------


def test_default_sequence(clock: FakeClock) -> None:
    health = HealthTracker(clock=clock)
    assert [health.record_failure("p", "m") for _ in range(7)] == [
        30.0,
        60.0,
        120.0,
        240.0,
        300.0,
        300.0,
        300.0,
    ]


def test_defaults() -> None:
    assert HealthConfig() == HealthConfig(
        initial_backoff=30.0,
        max_backoff=300.0,
        multiplier=2.0,
        jitter=0.0,
        failure_threshold=1,
        half_open_probes=1,
        probe_timeout=60.0,
    )
    assert HealthTracker().clock is time.monotonic


def test_multiplier_one_gives_constant_backoff(clock: FakeClock) -> None:
    health = tracker(clock, initial_backoff=5.0, multiplier=1.0)
    assert [health.record_failure("p", "m") for _ in range(4)] == [5.0] * 4


def test_backoff_counts_down_with_the_clock(clock: FakeClock) -> None:
    health = HealthTracker(clock=clock)
    health.record_failure("p", "m")
    clock.advance(12.5)
    assert health.backoff_remaining("p", "m") == pytest.approx(17.5)
    assert health.status("p", "m") == ModelHealth("backoff", 1, pytest.approx(17.5), 0)


def test_a_long_outage_does_not_overflow(clock: FakeClock) -> None:
    health = HealthTracker(clock=clock)
    for _ in range(2000):
        backoff = health.record_failure("p", "m")
    assert backoff == 300.0


def test_failure_of_unknown_start_during_backoff_steps_it_up(clock: FakeClock) -> None:
    health = HealthTracker(clock=clock)
    health.record_failure("p", "m")
    clock.advance(20)
    health.record_failure("p", "m")  # started=None: taken as a new failure, now
    assert health.backoff_remaining("p", "m") == 60.0


def test_failures_in_flight_when_the_backoff_began_do_not_step_it_up(clock: FakeClock) -> None:
    health = HealthTracker(HealthConfig(initial_backoff=1.0), clock=clock)
    started = clock()
    clock.advance(0.5)
    assert health.record_failure("p", "m", started=started) == 1.0
    version = health.version
    for _ in range(28):  # the rest of a burst that was in flight together
        clock.advance(0.01)
        assert health.record_failure("p", "m", started=started) is None
    assert health.status("p", "m") == ModelHealth("backoff", 1, pytest.approx(0.72), 0)
    assert health.version == version  # nothing changed: routers keep their pools

    # The backoff ends; the half-open probe fails: that is the next step of the episode.
    clock.advance(1.0)
    assert health.acquire("p", "m")
    assert health.status("p", "m").probes_in_flight == 1  # granted as the half-open probe
    probe_started = clock()
    assert health.record_failure("p", "m", started=probe_started) == 2.0
    # A late failure from the first burst still changes nothing.
    assert health.record_failure("p", "m", started=started) is None
    assert health.backoff_remaining("p", "m") == 2.0


def test_an_in_flight_failure_may_still_lengthen_the_backoff_to_its_retry_after(
    clock: FakeClock,
) -> None:
    health = HealthTracker(HealthConfig(initial_backoff=1.0), clock=clock)
    started = clock()
    clock.advance(0.1)
    health.record_failure("p", "m", started=started)
    version = health.version
    assert health.record_failure("p", "m", retry_after=20.0, started=started) is None
    assert health.status("p", "m").consecutive_failures == 1  # no step
    assert health.backoff_remaining("p", "m") == pytest.approx(20.0)  # as the provider asked
    assert health.version == version + 1
    assert health.record_failure("p", "m", retry_after=5.0, started=started) is None
    assert health.backoff_remaining("p", "m") == pytest.approx(20.0)  # never shortened


def test_after_recovery_a_failure_starts_a_new_episode_at_the_first_step(
    clock: FakeClock,
) -> None:
    health = HealthTracker(HealthConfig(initial_backoff=1.0), clock=clock)
    assert health.record_failure("p", "m", started=clock()) == 1.0
    clock.advance(1.0)
    assert health.record_failure("p", "m", started=clock()) == 2.0  # a failed probe
    clock.advance(2.0)
    health.record_success("p", "m")
    started = clock()
    assert health.record_failure("p", "m", started=started) == 1.0


# -- config validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"initial_backoff": -1.0}, "initial_backoff must be a finite number >= 0"),
        ({"initial_backoff": float("nan")}, "initial_backoff must be a finite number >= 0"),
        ({"max_backoff": float("inf")}, "max_backoff must be a finite number >= 0"),
        ({"max_backoff": -5.0, "initial_backoff": -10.0}, "initial_backoff"),
        ({"probe_timeout": -0.5}, "probe_timeout must be a finite number >= 0"),
        ({"initial_backoff": 60.0, "max_backoff": 30.0}, "max_backoff (30.0) must be >= initial"),
        ({"multiplier": 0.5}, "multiplier must be >= 1"),
        ({"multiplier": float("nan")}, "multiplier must be >= 1"),
        ({"jitter": -0.1}, "jitter must be in [0, 1)"),
        ({"jitter": 1.0}, "jitter must be in [0, 1)"),
        ({"failure_threshold": 0}, "failure_threshold must be an integer >= 1"),
        ({"failure_threshold": 2.5}, "failure_threshold must be an integer >= 1"),
        ({"failure_threshold": True}, "failure_threshold must be an integer >= 1"),
        ({"half_open_probes": 0}, "half_open_probes must be an integer >= 1"),
    ],
)
def test_invalid_health_config(kwargs: dict[str, float], fragment: str) -> None:
    with pytest.raises(ValueError, match="invalid HealthConfig") as info:
        HealthConfig(**kwargs)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_boundary_health_config_values_are_accepted() -> None:
    cfg = HealthConfig(initial_backoff=0.0, max_backoff=0.0, multiplier=1.0, jitter=0.0)
    assert cfg.max_backoff == 0.0
    assert HealthConfig(jitter=0.999).jitter == 0.999


# -- jitter -------------------------------------------------------------------------------------


def test_jitter_spreads_backoffs_within_bounds(clock: FakeClock) -> None:
    rng = random.Random(1234)
    firsts = []
    for _ in range(300):
        health = HealthTracker(HealthConfig(jitter=0.5), clock=clock, rng=rng)
        firsts.append(health.record_failure("p", "m"))
    assert all(15.0 <= b <= 45.0 for b in firsts)  # type: ignore[operator]
    # Really spread: both halves of the range are used, not one constant value.
    assert min(firsts) < 20.0  # type: ignore[type-var]
    assert max(firsts) > 40.0  # type: ignore[type-var]


def test_jitter_also_spreads_capped_backoffs(clock: FakeClock) -> None:
    # Once the cap is reached every client would otherwise retry in lockstep.
    health = HealthTracker(HealthConfig(jitter=0.2), clock=clock, rng=random.Random(5))
    backoffs = [health.record_failure("p", "m") for _ in range(40)]
    capped = backoffs[5:]
    assert all(240.0 <= b <= 300.0 for b in capped)  # type: ignore[operator]
    assert len(set(capped)) > 10


def test_jitter_is_reproducible_with_a_seeded_rng(clock: FakeClock) -> None:
    def run(seed: int) -> list[float | None]:
        health = HealthTracker(HealthConfig(jitter=0.3), clock=clock, rng=random.Random(seed))
        return [health.record_failure("p", "m") for _ in range(5)]

    assert run(7) == run(7)
    assert run(7) != run(8)


# -- retry_after --------------------------------------------------------------------------------


def test_retry_after_lengthens_the_backoff(clock: FakeClock) -> None:
    health = HealthTracker(clock=clock)
    assert health.record_failure("p", "m", retry_after=120.0) == 120.0
    clock.advance(119)
    assert not health.is_available("p", "m")
    clock.advance(1)
    assert health.is_available("p", "m")


def test_retry_after_may_exceed_max_backoff(clock: FakeClock) -> None:
    health = tracker(clock, initial_backoff=10.0, max_backoff=20.0)
    assert health.record_failure("p", "m", retry_after=500.0) == 500.0


def test_short_retry_after_does_not_shorten_the_backoff(clock: FakeClock) -> None:
    health = HealthTracker(clock=clock)
    health.record_failure("p", "m")
    assert health.record_failure("p", "m", retry_after=5.0) == 60.0


def test_retry_after_is_capped(clock: FakeClock) -> None:
    health = HealthTracker(clock=clock)
    assert health.record_failure("p", "m", retry_after=10 * 86400.0) == MAX_RETRY_AFTER == 3600.0


@pytest.mark.parametrize("retry_after", [0.0, -10.0, float("nan")])
def test_meaningless_retry_after_is_ignored(clock: FakeClock, retry_after: float) -> None:
    health = HealthTracker(clock=clock)
    assert health.record_failure("p", "m", retry_after=retry_after) == 30.0


# -- failure threshold --------------------------------------------------------------------------


def test_failure_threshold(clock: FakeClock) -> None:
    health = HealthTracker(HealthConfig(failure_threshold=3), clock=clock)
    assert health.record_failure("p", "m") is None
    assert health.record_failure("p", "m") is None
    assert health.is_available("p", "m")
    assert health.backoff_remaining("p", "m") is None
    assert health.unavailable() == []
    assert health.status("p", "m") == ModelHealth("available", 2, None, 0)
    assert health.record_failure("p", "m") == 30.0
    assert not health.is_available("p", "m")
    assert health.record_failure("p", "m") == 60.0
    assert health.unavailable() == [("p", "m", 4)]


def test_success_resets_the_threshold_count(clock: FakeClock) -> None:
    health = HealthTracker(HealthConfig(failure_threshold=2), clock=clock)
    health.record_failure("p", "m")
    health.record_success("p", "m")
    assert health.record_failure("p", "m") is None  # counting starts again
    assert health.record_failure("p", "m") == 30.0


def test_acquire_below_threshold_does_not_use_probe_slots(clock: FakeClock) -> None:
    health = HealthTracker(HealthConfig(failure_threshold=3), clock=clock)
    health.record_failure("p", "m")
    assert all(health.acquire("p", "m") for _ in range(10))
    assert health.is_available("p", "m")


# -- half-open probing --------------------------------------------------------------------------


def back_off_and_elapse(health: HealthTracker, clock: FakeClock) -> None:
    backoff = health.record_failure("p", "m")
    assert backoff is not None
    clock.advance(backoff)


def test_healthy_model_acquire_is_unlimited(clock: FakeClock) -> None:
    health = HealthTracker(clock=clock)
    version = health.version
    assert all(health.acquire("p", "m") for _ in range(100))
    assert health.is_available("p", "m")
    assert health.version == version
    health.release("p", "m")  # nothing held: harmless
    assert health.is_available("p", "m")


def test_acquire_during_backoff_is_refused(clock: FakeClock) -> None:
    health = HealthTracker(clock=clock)
    health.record_failure("p", "m")
    assert not health.acquire("p", "m")


def test_one_probe_after_backoff(clock: FakeClock) -> None:
    health = HealthTracker(clock=clock)
    back_off_and_elapse(health, clock)
    assert health.is_available("p", "m")
    assert health.status("p", "m") == ModelHealth("probing", 1, 0.0, 0)
    assert health.acquire("p", "m")
    assert not health.is_available("p", "m")
    assert not health.acquire("p", "m")
    assert health.status("p", "m") == ModelHealth("probing", 1, 0.0, 1)
    assert health.unavailable() == [("p", "m", 1)]
    assert health.backoff_remaining("p", "m") == 0.0


def test_probe_success_restores_the_model(clock: FakeClock) -> None:
    health = HealthTracker(clock=clock)
    back_off_and_elapse(health, clock)
    assert health.acquire("p", "m")
    health.record_success("p", "m")
    assert all(health.acquire("p", "m") for _ in range(10))
    assert health.status("p", "m") == ModelHealth("available", 0, None, 0)


def test_probe_failure_backs_off_longer(clock: FakeClock) -> None:
    # probe_timeout longer than the next backoff, so only the failure itself can free the slot
    health = HealthTracker(HealthConfig(probe_timeout=600.0), clock=clock)
    back_off_and_elapse(health, clock)
    assert health.acquire("p", "m")
    assert health.record_failure("p", "m") == 60.0
    assert not health.is_available("p", "m")
    clock.advance(60)
    # The failed probe's slot does not linger into the next half-open window.
    assert health.acquire("p", "m")


def test_release_frees_the_probe_slot(clock: FakeClock) -> None:
    health = HealthTracker(clock=clock)
    back_off_and_elapse(health, clock)
    assert health.acquire("p", "m")
    health.release("p", "m")
    assert health.is_available("p", "m")
    assert health.acquire("p", "m")
    assert not health.acquire("p", "m")
    # release is neutral: the failure count is untouched
    assert health.status("p", "m").consecutive_failures == 1


def test_several_probe_slots(clock: FakeClock) -> None:
    health = HealthTracker(HealthConfig(half_open_probes=3), clock=clock)
    back_off_and_elapse(health, clock)
    assert [bool(health.acquire("p", "m")) for _ in range(4)] == [True, True, True, False]
    health.release("p", "m")
    assert health.acquire("p", "m")
    assert not health.acquire("p", "m")


def test_lost_probe_is_released_after_probe_timeout(clock: FakeClock) -> None:
    health = HealthTracker(HealthConfig(probe_timeout=60.0), clock=clock)
    back_off_and_elapse(health, clock)
    assert health.acquire("p", "m")
    clock.advance(59.9)
    assert not health.is_available("p", "m")
    clock.advance(0.1)
    assert health.is_available("p", "m")
    assert health.status("p", "m").probes_in_flight == 0
    assert health.acquire("p", "m")


def test_probe_timeout_expires_oldest_probes_first(clock: FakeClock) -> None:
    health = HealthTracker(HealthConfig(half_open_probes=2, probe_timeout=10.0), clock=clock)
    back_off_and_elapse(health, clock)
    assert health.acquire("p", "m")
    clock.advance(5)
    assert health.acquire("p", "m")
    assert not health.is_available("p", "m")
    clock.advance(5)  # the first probe is 10 s old, the second 5 s
    assert health.status("p", "m").probes_in_flight == 1
    assert health.acquire("p", "m")
    assert not health.acquire("p", "m")


def test_availability_reports_when_it_will_change(clock: FakeClock) -> None:
    health = HealthTracker(HealthConfig(probe_timeout=60.0), clock=clock)
    assert health.availability("p", "m") == (True, float("inf"))
    health.record_failure("p", "m")
    assert health.availability("p", "m") == (False, clock.now + 30.0)
    clock.advance(30)
    assert health.availability("p", "m") == (True, float("inf"))
    health.acquire("p", "m")
    assert health.availability("p", "m") == (False, clock.now + 60.0)


def test_version_changes_on_availability_events(clock: FakeClock) -> None:
    # The router caches its pools on `version`; every event that changes availability bumps it.
    health = HealthTracker(clock=clock)
    seen = [health.version]
    health.record_failure("p", "m")
    seen.append(health.version)
    clock.advance(30)
    health.acquire("p", "m")
    seen.append(health.version)
    health.release("p", "m")
    seen.append(health.version)
    health.record_success("p", "m")
    seen.append(health.version)
    assert seen == sorted(seen)
    assert len(set(seen)) == len(seen)
