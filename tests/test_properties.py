"""Property tests: draw frequencies, health invariants and config round-trips.

The 100,000-draw frequency checks use a fixed seed (deterministic, no flakiness); hypothesis
drives the smaller properties.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from _clock import FakeClock
from tier_middleware import (
    ConfigError,
    HealthConfig,
    HealthTracker,
    NoHealthyModel,
    TierConfig,
    TierRouter,
)
from tier_middleware._health import MAX_RETRY_AFTER

# -- chi-square frequency checks ----------------------------------------------------------------

# Upper critical values of the chi-square distribution at p = 0.001, keyed by degrees of
# freedom (k - 1 for k models), as in any chi-square table (e.g. NIST/SEMATECH e-Handbook,
# table 1.3.6.7.4). A statistic above the value means p < 0.001.
CHI2_CRITICAL_P001 = {4: 18.467, 5: 20.515, 27: 55.476, 29: 58.301}


def chi_square(observed: Counter[Any], expected_share: dict[Any, float], n: int) -> float:
    return sum((observed[k] - n * p) ** 2 / (n * p) for k, p in expected_share.items())


def tier_of(models: list[dict[str, Any]]) -> TierConfig:
    other = [{"provider": "x", "model": "y", "relative_cost": 1}]
    return TierConfig.load({"tiers": {"simple": models, "moderate": other, "complex": other}})


DRAWS = 100_000


def test_frequencies_match_weights_over_100k_draws() -> None:
    costs = [1, 2, 3, 5, 8]
    models = [{"provider": f"p{i}", "model": "m", "relative_cost": c} for i, c in enumerate(costs)]
    models.append({"provider": "p5", "model": "m", "relative_cost": 50, "weight": 0.3})
    weights = [1 / c for c in costs] + [0.3]
    total = sum(weights)
    expected = {(f"p{i}", "m"): w / total for i, w in enumerate(weights)}

    router = TierRouter(tier_of(models), HealthTracker(clock=FakeClock()), rng=random.Random(2024))
    observed = Counter(router.select_now("simple").key for _ in range(DRAWS))

    assert set(observed) == set(expected)
    stat = chi_square(observed, expected, DRAWS)
    assert stat < CHI2_CRITICAL_P001[len(expected) - 1], stat
    # The check has teeth: the same draws are wildly incompatible with a uniform choice.
    uniform = {k: 1 / len(expected) for k in expected}
    assert chi_square(observed, uniform, DRAWS) > 100 * CHI2_CRITICAL_P001[len(expected) - 1]


def test_frequencies_match_weights_with_backoff_and_exclusion() -> None:
    models = [{"provider": "p", "model": f"m{i}", "relative_cost": i + 1} for i in range(30)]
    clock = FakeClock()
    health = HealthTracker(clock=clock)
    health.record_failure("p", "m0")  # the heaviest model is in backoff
    excluded = {("p", "m1")}
    live = {("p", f"m{i}"): 1 / (i + 1) for i in range(2, 30)}
    total = sum(live.values())
    expected = {k: w / total for k, w in live.items()}

    router = TierRouter(tier_of(models), health, rng=random.Random(7))
    observed = Counter(router.select_now("simple", exclude=excluded).key for _ in range(DRAWS))

    assert set(observed) == set(expected)
    stat = chi_square(observed, expected, DRAWS)
    assert stat < CHI2_CRITICAL_P001[len(expected) - 1], stat


def test_frequencies_match_weights_within_preferred_provider() -> None:
    models = [
        {"provider": "openai", "model": "a", "relative_cost": 1},
        {"provider": "openai", "model": "b", "relative_cost": 2},
        {"provider": "openai", "model": "c", "relative_cost": 4},
        {"provider": "openai", "model": "d", "relative_cost": 1, "weight": 0.05},
        {"provider": "openai", "model": "e", "relative_cost": 7},
        {"provider": "azure", "model": "a", "relative_cost": 1, "weight": 1000.0},
    ]
    weights = {"a": 1.0, "b": 0.5, "c": 0.25, "d": 0.05, "e": 1 / 7}
    total = sum(weights.values())
    expected = {("openai", k): w / total for k, w in weights.items()}

    router = TierRouter(tier_of(models), HealthTracker(clock=FakeClock()), rng=random.Random(1))
    observed = Counter(
        router.select_now("simple", preferred_provider="openai").key for _ in range(DRAWS)
    )

    assert set(observed) == set(expected)
    assert chi_square(observed, expected, DRAWS) < CHI2_CRITICAL_P001[len(expected) - 1]


# -- strategies ---------------------------------------------------------------------------------

TIER_NAMES = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,15}", fullmatch=True)
NAMES = (
    st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=20)
    .map(str.strip)
    .filter(bool)
)
FINITE_PRICE = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)
WEIGHTS = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)

CAMEL = {
    "relative_cost": "relativeCost",
    "input_price_per_million": "inputPricePerMillion",
    "output_price_per_million": "outputPricePerMillion",
}


@st.composite
def model_dicts(draw: st.DrawFn, provider: str, name: str) -> dict[str, Any]:
    camel = draw(st.booleans())

    def key(field: str) -> str:
        return CAMEL.get(field, field) if camel else field

    entry: dict[str, Any] = {
        "provider": provider,
        "model": name,
        key("relative_cost"): draw(st.integers(1, 10_000)),
    }
    for field in ("input_price_per_million", "output_price_per_million"):
        if draw(st.booleans()):
            entry[key(field)] = draw(FINITE_PRICE)
    if draw(st.booleans()):
        entry["weight"] = draw(WEIGHTS)
    return entry


@st.composite
def config_dicts(draw: st.DrawFn) -> dict[str, Any]:
    order = draw(st.lists(TIER_NAMES, min_size=1, max_size=4, unique=True))
    tiers = {}
    for tier in order:
        pairs = draw(st.lists(st.tuples(NAMES, NAMES), min_size=1, max_size=5, unique=True))
        tiers[tier] = [draw(model_dicts(p, m)) for p, m in pairs]
    data: dict[str, Any] = {
        "tiers": tiers,
        "tierOrder" if draw(st.booleans()) else "tier_order": order,
    }
    if draw(st.booleans()):
        data["version"] = draw(st.one_of(st.text(max_size=10), st.integers(0, 10**6)))
    if draw(st.booleans()):
        data["updatedAt"] = draw(st.text(max_size=30))
    return data


# -- config properties --------------------------------------------------------------------------


@given(config_dicts(), st.booleans())
def test_config_round_trips(data: dict[str, Any], envelope: bool) -> None:
    cfg = TierConfig.load({"success": True, "data": data} if envelope else data)
    assert TierConfig.load(cfg.to_dict()) == cfg
    assert TierConfig.load(json.loads(json.dumps(cfg.to_dict()))) == cfg
    order = data.get("tierOrder", data.get("tier_order"))
    assert cfg.tier_order == tuple(order)
    for tier in order:
        assert [m.key for m in cfg.models(tier)] == [
            (e["provider"], e["model"]) for e in data["tiers"][tier]
        ]


BAD_VALUES = st.one_of(
    st.tuples(st.just("relative_cost"), st.integers(max_value=0), st.just("must be >= 1")),
    st.tuples(
        st.just("weight"),
        st.sampled_from([math.nan, math.inf, -math.inf]),
        st.just("must be a finite number"),
    ),
    st.tuples(
        st.just("weight"),
        st.floats(max_value=0, allow_nan=False, allow_infinity=False),
        st.just("must be > 0"),
    ),
    st.tuples(
        st.sampled_from(["input_price_per_million", "output_price_per_million"]),
        st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False),
        st.just("must be >= 0"),
    ),
)


@given(config_dicts(), st.data(), BAD_VALUES, st.booleans())
def test_bad_model_is_rejected_naming_field_tier_and_model(
    data: dict[str, Any], pick: st.DataObject, bad: tuple[str, Any, str], camel: bool
) -> None:
    field, value, text = bad
    tier = pick.draw(st.sampled_from(sorted(data["tiers"])))
    entry = pick.draw(st.sampled_from(data["tiers"][tier]))
    entry.pop(field, None)
    entry.pop(CAMEL.get(field, field), None)
    entry[CAMEL.get(field, field) if camel else field] = value

    with pytest.raises(ConfigError) as info:
        TierConfig.load(data)
    message = str(info.value)
    assert f"{field} {text}" in message
    assert f"(tier {tier!r}, model {entry['provider']}/{entry['model']})" in message
    assert "validation error" not in message


@given(config_dicts(), st.data())
def test_duplicate_model_is_rejected(data: dict[str, Any], pick: st.DataObject) -> None:
    tier = pick.draw(st.sampled_from(sorted(data["tiers"])))
    entry = pick.draw(st.sampled_from(data["tiers"][tier]))
    data["tiers"][tier].append(dict(entry))
    with pytest.raises(ConfigError) as info:
        TierConfig.load(data)
    assert f"model {entry['provider']}/{entry['model']} appears twice in tier {tier!r}" in str(
        info.value
    )


# -- router properties --------------------------------------------------------------------------


@st.composite
def router_scenarios(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 12))
    keys = [(f"p{draw(st.integers(0, 3))}", f"m{i % 4}") for i in range(n)]
    keys = list(dict.fromkeys(keys))  # a (provider, model) pair appears once per tier
    costs = [draw(st.integers(1, 20)) for _ in keys]
    failures = {k: draw(st.integers(0, 3)) for k in keys}
    excluded = draw(st.sets(st.sampled_from(keys)))
    elapsed = draw(st.floats(0, 150))
    preferred = draw(st.one_of(st.none(), st.sampled_from(["p0", "p1", "p2", "p3", "p9"])))
    seed = draw(st.integers(0, 2**32 - 1))
    return {
        "keys": keys,
        "costs": costs,
        "failures": failures,
        "excluded": excluded,
        "elapsed": elapsed,
        "preferred": preferred,
        "seed": seed,
    }


@given(router_scenarios())
def test_unavailable_or_excluded_models_are_never_returned(scenario: dict[str, Any]) -> None:
    keys = scenario["keys"]
    models = [
        {"provider": p, "model": m, "relative_cost": c}
        for (p, m), c in zip(keys, scenario["costs"], strict=True)
    ]
    clock = FakeClock()
    health = HealthTracker(clock=clock)  # backoffs 30, 60, 120 s; one half-open probe
    router = TierRouter(tier_of(models), health, rng=random.Random(scenario["seed"]))
    ends = {}
    for key, count in scenario["failures"].items():
        for _ in range(count):
            health.record_failure(*key)
        if count:
            ends[key] = clock.now + 30.0 * 2 ** (count - 1)
    clock.advance(scenario["elapsed"])

    in_backoff = {k for k, end in ends.items() if clock.now < end}
    probing = set(ends) - in_backoff
    excluded = scenario["excluded"]
    healthy = set(keys) - set(ends)

    returned: Counter[tuple[str, str]] = Counter()
    for _ in range(40):
        try:
            chosen = router.select_now(
                "simple", preferred_provider=scenario["preferred"], exclude=excluded
            )
        except NoHealthyModel:
            # Only possible when nothing but backed-off, probing or excluded models remain.
            assert not (healthy - excluded)
            continue
        returned[chosen.key] += 1
        assert chosen.key not in excluded
        assert chosen.key not in in_backoff
        if scenario["preferred"] is not None and chosen.provider != scenario["preferred"]:
            # Falling back is only allowed when the preferred provider has no healthy model left.
            assert not {k for k in healthy - excluded if k[0] == scenario["preferred"]}
    for key in probing:
        assert returned[key] <= 1  # one half-open probe until an outcome is recorded


@given(
    st.lists(st.integers(1, 1000), min_size=1, max_size=20),
    st.lists(st.one_of(st.none(), WEIGHTS), min_size=20, max_size=20),
    st.sets(st.integers(0, 19)),
)
def test_probabilities_match_weights(
    costs: list[int], weights: list[float | None], failing: set[int]
) -> None:
    models = [
        {"provider": "p", "model": f"m{i}", "relative_cost": c, "weight": weights[i]}
        for i, c in enumerate(costs)
    ]
    health = HealthTracker(clock=FakeClock())
    for i in failing:
        health.record_failure("p", f"m{i}")
    router = TierRouter(tier_of(models), health)
    probs = router.probabilities("simple")

    live = {
        ("p", f"m{i}"): (weights[i] if weights[i] is not None else 1 / c)
        for i, c in enumerate(costs)
        if i not in failing
    }
    total = sum(live.values())
    assert set(probs) == {("p", f"m{i}") for i in range(len(costs))}
    for key, p in probs.items():
        assert p == pytest.approx(live[key] / total if key in live else 0.0, rel=1e-9)
    if live:
        assert math.fsum(probs.values()) == pytest.approx(1.0)
    else:
        assert set(probs.values()) == {0.0}


# -- health properties --------------------------------------------------------------------------


ANY_JITTER = st.floats(0, 0.99)
ANY_THRESHOLD = st.integers(1, 5)


@st.composite
def health_configs(
    draw: st.DrawFn,
    jitter: st.SearchStrategy[float] = ANY_JITTER,
    threshold: st.SearchStrategy[int] = ANY_THRESHOLD,
) -> HealthConfig:
    initial = draw(st.floats(0, 1000))
    return HealthConfig(
        initial_backoff=initial,
        max_backoff=initial + draw(st.floats(0, 10_000)),
        multiplier=draw(st.floats(1, 10)),
        jitter=draw(jitter),
        failure_threshold=draw(threshold),
    )


@given(
    health_configs(),
    st.lists(st.floats(0, 500), min_size=1, max_size=60),
    st.integers(0, 2**32 - 1),
)
def test_backoff_never_exceeds_the_cap(cfg: HealthConfig, gaps: list[float], seed: int) -> None:
    clock = FakeClock()
    health = HealthTracker(cfg, clock=clock, rng=random.Random(seed))
    for n, gap in enumerate(gaps, start=1):
        clock.advance(gap)
        backoff = health.record_failure("p", "m")
        if n < cfg.failure_threshold:
            assert backoff is None
            assert health.is_available("p", "m")
            continue
        assert backoff is not None
        assert backoff <= cfg.max_backoff
        assert backoff >= cfg.initial_backoff * (1 - cfg.jitter) * (1 - 1e-12)
        remaining = health.backoff_remaining("p", "m")
        assert remaining is not None
        # `until - now` is computed on the clock, so allow its rounding (a couple of ulps).
        assert remaining <= cfg.max_backoff + 2 * math.ulp(clock.now + cfg.max_backoff)
        if backoff >= 1e-6:  # smaller ones vanish when added to the clock's 1000 s
            assert not health.is_available("p", "m")


@given(health_configs(jitter=st.just(0.0)), st.integers(1, 40))
def test_backoff_without_jitter_grows_monotonically(cfg: HealthConfig, failures: int) -> None:
    health = HealthTracker(cfg, clock=FakeClock())
    backoffs = [health.record_failure("p", "m") for _ in range(failures)]
    started = [b for b in backoffs if b is not None]
    assert len(started) == max(0, failures - cfg.failure_threshold + 1)
    assert started == sorted(started)
    for k, b in enumerate(started):
        exact = cfg.initial_backoff * cfg.multiplier**k
        assert b == pytest.approx(min(exact, cfg.max_backoff), rel=1e-9)


@given(
    health_configs(threshold=st.just(1)),
    st.floats(min_value=1e-3, max_value=1e6, allow_nan=False),
    st.integers(0, 2**32 - 1),
)
def test_retry_after_sets_a_floor(cfg: HealthConfig, retry_after: float, seed: int) -> None:
    health = HealthTracker(cfg, clock=FakeClock(), rng=random.Random(seed))
    backoff = health.record_failure("p", "m", retry_after=retry_after)
    assert backoff is not None
    floor = min(retry_after, MAX_RETRY_AFTER)
    assert backoff >= floor
    assert backoff <= max(cfg.max_backoff, floor)


# -- the compact-body fast path of the duplicate-member check ----------------------------------

KEYS = st.sampled_from(
    ["tier", "model", "messages", "t\\u0069er", "mod\\u0065l", "\u00e9", 'a\\"b']
)
VALUES = st.sampled_from(['"simple"', '"tier:complex"', "[1,2]", '{"tier":"x"}', "null", '"a b"'])


@given(st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=6), st.sampled_from([",", ", "]))
def test_a_body_taken_as_compact_names_no_member_twice(
    members: list[tuple[str, str]], comma: str
) -> None:
    """`Payload.compact` lets the middleware skip the search for a member named twice: it may
    only say True for a body in which every top-level key (decoded) appears once."""
    from tier_middleware._payload import parse_object, repeated

    body = ("{" + comma.join(f'"{k}":{v}' for k, v in members) + "}").encode()
    payload = parse_object(body)
    assert payload is not None
    keys = [json.loads(f'"{k}"') for k, _ in members]
    if payload.compact(body):
        assert len(set(keys)) == len(keys)
        assert all(repeated(body, key) is None for key in ("tier", "model"))
    elif comma == "," and len(set(keys)) == len(keys):
        # plain ASCII keys, each once, no whitespace: the fast path (others may fall back)
        plain = all(k == json.loads(f'"{k}"') and k.isascii() for k, _ in members)
        assert payload.compact(body) or not plain
