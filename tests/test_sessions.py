"""The session rules: stick to a model, never go down a tier, upgrade preferring the provider."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from _clock import FakeClock
from configs import entry, one_tier, two_per_tier
from tier_middleware import HealthTracker, TierConfig, TierRouter
from tier_middleware._sessions import decide, session_key, valid_session_id
from tier_middleware._stores.base import SessionRecord

pytestmark = pytest.mark.anyio

CONFIG = TierConfig.load(two_per_tier())


def router(seed: int = 0) -> TierRouter:
    return TierRouter(CONFIG, HealthTracker(clock=FakeClock()), rng=random.Random(seed))


def record(provider: str, model: str, tier: str) -> SessionRecord:
    return SessionRecord(provider, model, tier, created_at=100.0, updated_at=100.0)


async def test_first_request_selects_and_creates() -> None:
    decision = await decide(router(), None, "moderate", now=500.0)
    assert decision.selection.tier == "moderate"
    assert decision.record is not None
    assert (decision.record.model, decision.record.tier) == (decision.selection.model, "moderate")
    assert decision.record.created_at == decision.record.updated_at == 500.0


async def test_same_tier_keeps_the_model_and_writes_nothing() -> None:
    for seed in range(20):
        decision = await decide(
            router(seed), record("anthropic", "haiku", "simple"), "simple", now=500.0
        )
        assert decision.selection.model == "haiku"
        assert decision.record is None


async def test_a_lower_tier_never_downgrades() -> None:
    decision = await decide(router(), record("anthropic", "opus", "complex"), "simple", 500.0)
    assert (decision.selection.tier, decision.selection.model) == ("complex", "opus")
    assert decision.record is None


async def test_a_higher_tier_upgrades_preferring_the_provider() -> None:
    for seed in range(20):
        decision = await decide(
            router(seed), record("anthropic", "haiku", "simple"), "complex", 500.0
        )
        assert (decision.selection.tier, decision.selection.provider) == ("complex", "anthropic")
        assert decision.upgraded_from == "simple"
        assert decision.record is not None
        assert decision.record.created_at == 100.0  # the conversation's start is kept
        assert decision.record.updated_at == 500.0


async def test_session_model_in_backoff_moves_within_the_tier_to_the_same_provider() -> None:
    config = TierConfig.load(
        one_tier(entry("openai", "mini"), entry("openai", "nano"), entry("anthropic", "haiku"))
    )
    r = TierRouter(config, HealthTracker(clock=FakeClock()), rng=random.Random(3))
    r.health.record_failure("openai", "mini")
    for _ in range(20):
        decision = await decide(r, record("openai", "mini", "simple"), "simple", 500.0)
        assert decision.selection.model == "nano"  # same provider, other model
        assert decision.record is not None
        assert decision.record.model == "nano"


async def test_upgrade_falls_back_to_any_provider_when_the_preferred_one_is_down() -> None:
    r = router()
    r.health.record_failure("anthropic", "opus")
    decision = await decide(r, record("anthropic", "haiku", "simple"), "complex", 500.0)
    assert decision.selection.model == "o3"


async def test_a_session_whose_tier_left_the_config_starts_over() -> None:
    decision = await decide(router(), record("x", "y", "legacy"), "simple", 500.0)
    assert decision.selection.tier == "simple"
    assert decision.record is not None
    assert decision.record.created_at == 500.0


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"a" * 129,
        b"has space",
        b"a/b",
        b"line\nbreak",
        "caf\u00e9".encode(),
        b"tab\t",
        b"x\x00",
    ],
)
def test_bad_session_ids_are_refused(raw: bytes) -> None:
    assert valid_session_id(raw) is None


@given(st.text(alphabet="abcXYZ019._:-", min_size=1, max_size=128))
def test_good_session_ids_are_accepted(text: str) -> None:
    assert valid_session_id(text.encode()) == text


def test_session_keys_separate_identities_and_hide_secrets() -> None:
    alice = session_key("Bearer sk-alice-secret", "conv-1")
    bob = session_key("Bearer sk-bob-secret", "conv-1")
    anonymous = session_key("", "conv-1")
    assert len({alice, bob, anonymous}) == 3
    assert "sk-alice" not in alice
    assert alice.endswith(":conv-1")
    assert session_key("Bearer sk-alice-secret", "conv-1") == alice
