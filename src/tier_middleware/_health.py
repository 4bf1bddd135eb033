"""Provider health: exponential backoff after failures, then a few half-open probes."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from ._attribution import Evidence

logger = logging.getLogger("tier_middleware")

Clock = Callable[[], float]
Key = tuple[str, str]
HealthState = Literal["available", "backoff", "probing"]

# A provider's Retry-After is honoured up to an hour, so one bad header cannot park a model for days.
MAX_RETRY_AFTER = 3600.0
PROBE = 2  # what `acquire` returns for a half-open probe


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """How long a failing model is left alone, and how it is let back in.

    Times are seconds. A model is backed off after `failure_threshold` consecutive failures for
    `initial_backoff * multiplier ** (n - 1)` (n-th backoff), capped at `max_backoff`, each
    multiplied by a random factor in [1 - jitter, 1 + jitter] (and capped again). When a backoff
    ends, at most `half_open_probes` requests reach the model until one reports back; a probe that
    never reports is forgotten after `probe_timeout`.
    """

    initial_backoff: float = 30.0
    max_backoff: float = 300.0
    multiplier: float = 2.0
    jitter: float = 0.0
    failure_threshold: int = 1
    half_open_probes: int = 1
    probe_timeout: float = 60.0
    unconfirmed_threshold: int = 3
    unconfirmed_window: float = 60.0

    def __post_init__(self) -> None:
        def bad(reason: str) -> ValueError:
            return ValueError(f"invalid HealthConfig: {reason}")

        for name in ("initial_backoff", "max_backoff", "probe_timeout", "unconfirmed_window"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise bad(f"{name} must be a finite number >= 0, got {value!r}")
        if self.max_backoff < self.initial_backoff:
            raise bad(
                f"max_backoff ({self.max_backoff}) must be >= initial_backoff "
                f"({self.initial_backoff})"
            )
        if not math.isfinite(self.multiplier) or self.multiplier < 1:
            raise bad(f"multiplier must be >= 1, got {self.multiplier!r}")
        if not math.isfinite(self.jitter) or not 0 <= self.jitter < 1:
            raise bad(f"jitter must be in [0, 1), got {self.jitter!r}")
        for name in ("failure_threshold", "half_open_probes", "unconfirmed_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True, slots=True)
class ModelHealth:
    """A point-in-time view of one model, for status pages and metrics."""

    state: HealthState
    consecutive_failures: int
    backoff_remaining: float | None
    probes_in_flight: int
    unconfirmed_failures: int = 0  # distinct requests whose failure waits for agreement


def backoff_step(
    failures: int,
    until: float,
    since: float,
    config: HealthConfig,
    retry_after: float | None,
    now: float,
    started: float,
    jitter_factor: float = 1.0,
) -> tuple[int, float, float, float | None]:
    """(consecutive failures, backoff end, backoff start, the backoff it began or None) after a
    failure of an attempt that started at `started`, from the first three before it (`until` and
    `since` are 0.0 while no backoff is set). The one Python copy of the rule; the Redis script mirrors it line by line.

    An attempt that was in flight when the current backoff began steps nothing up: a burst of
    requests failing together is one failure. Its provider's Retry-After may still lengthen the
    backoff, which is the least the provider asked for.
    """
    floor = 0.0  # the provider's own Retry-After, bounded
    if retry_after is not None and math.isfinite(retry_after) and retry_after > 0:
        floor = min(retry_after, MAX_RETRY_AFTER)
    if until > 0.0 and started < since:
        if floor:
            until = max(until, now + floor)
        return failures, until, since, None
    failures += 1
    n = failures - config.failure_threshold + 1
    if n < 1:
        return failures, until, since, None
    try:
        # The exponent stops at 64 (as in the Redis script) so the float stays finite.
        growth = config.multiplier ** min(n - 1, 64)
    except OverflowError:  # a multiplier above ~65000: Lua (and IEEE) make it inf
        growth = math.inf
    backoff = min(config.initial_backoff * growth, config.max_backoff)
    backoff = min(backoff * jitter_factor, config.max_backoff)  # capped backoffs spread out too
    backoff = max(backoff, floor)
    return failures, now + backoff, now, backoff


class _State:
    __slots__ = ("failures", "probes", "since", "until")

    def __init__(self) -> None:
        self.failures = 0  # consecutive failures
        self.until = 0.0  # end of the current backoff, on the tracker's clock
        self.since = 0.0  # when the current backoff began
        self.probes: list[float] = []  # start times of half-open probes not yet reported


class HealthTracker:
    """Tracks (provider, model) health in process; unknown pairs are available.

    `clock` returns monotonic seconds (tests inject one and never sleep); `rng` is a
    `random.Random` used for jitter.
    """

    def __init__(
        self,
        config: HealthConfig | None = None,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config or HealthConfig()
        self.clock: Clock = clock or time.monotonic
        self._rng = rng or random.Random()
        self._states: dict[Key, _State] = {}
        cfg = self.config
        self.evidence = Evidence(
            cfg.unconfirmed_threshold, cfg.unconfirmed_window, lambda: self.clock()
        )
        self._held = self.evidence.held
        # Bumped whenever availability changes by an event (not by time passing), so callers
        # can cache what they derived from it.
        self.version = 0

    # -- queries ----------------------------------------------------------------------------

    def availability(self, provider: str, model: str) -> tuple[bool, float]:
        """Whether the model may take a request now, and when that may change without any event
        (`math.inf` if never)."""
        state = self._states.get((provider, model))
        if state is None:
            return True, math.inf
        return self._evaluate(state, self.clock())

    def is_available(self, provider: str, model: str) -> bool:
        return self.availability(provider, model)[0]

    def backoff_remaining(self, provider: str, model: str) -> float | None:
        """Seconds until the backoff ends; 0.0 once it has ended but the model is still on
        probation; None for a model that is not backed off."""
        state = self._states.get((provider, model))
        if state is None or state.until == 0.0:
            return None
        return max(0.0, state.until - self.clock())

    def unavailable(self) -> list[tuple[str, str, int]]:
        """(provider, model, consecutive failures) of every model that cannot take a request now."""
        now = self.clock()
        return [
            (provider, model, state.failures)
            for (provider, model), state in self._states.items()
            if not self._evaluate(state, now)[0]
        ]

    def known(self, provider: str, model: str) -> bool:
        """Whether any failure of the model is on record (a success then has news to tell)."""
        return (provider, model) in self._states

    def random(self) -> float:
        """A draw from the tracker's rng (jitter computed elsewhere stays reproducible)."""
        return self._rng.random()

    def status(self, provider: str, model: str) -> ModelHealth:
        key = (provider, model)
        unconfirmed = self.evidence.pending(key)
        state = self._states.get(key)
        if state is None:
            return ModelHealth("available", 0, None, 0, unconfirmed)
        now = self.clock()
        self._expire_probes(state, now)
        if now < state.until:
            return ModelHealth("backoff", state.failures, state.until - now, 0, unconfirmed)
        kind: HealthState = "probing" if state.until else "available"
        remaining = 0.0 if state.until else None
        return ModelHealth(kind, state.failures, remaining, len(state.probes), unconfirmed)

    # -- events ------------------------------------------------------------------------------

    def acquire(self, provider: str, model: str) -> bool:
        """Claim the model for one request. Always granted for a healthy model; a model whose
        backoff has ended takes a half-open probe slot, and is refused when none is free."""
        return self._grant(provider, model) != 0

    def _grant(self, provider: str, model: str) -> int:
        """`acquire`, saying how (for the router): 0 refused, 1 granted, `PROBE` (2) granted as
        a half-open probe."""
        state = self._states.get((provider, model))
        if state is None or state.until == 0.0:
            return 1
        now = self.clock()
        available, _ = self._evaluate(state, now)
        if not available:
            return 0
        state.probes.append(now)
        if len(state.probes) >= self.config.half_open_probes:
            self.version += 1
        return PROBE

    def release(self, provider: str, model: str) -> None:
        """The request told nothing about the model's health (a caller error, a disconnect):
        give its probe slot back, if it held one."""
        state = self._states.get((provider, model))
        if state is not None and state.probes:
            state.probes.pop(0)
            self.version += 1

    def record_success(self, provider: str, model: str) -> None:
        state = self._states.pop((provider, model), None)
        if self._held:  # the model answered: what waited for agreement against it is moot
            self.evidence.clear((provider, model))
        if state is not None and state.until:
            self.version += 1
            logger.info(
                "model recovered",
                extra={"provider": provider, "model": model, "previous_failures": state.failures},
            )

    def record_failure(
        self,
        provider: str,
        model: str,
        retry_after: float | None = None,
        *,
        started: float | None = None,
    ) -> float | None:
        """Count a failure of an attempt that started at `started` (the tracker's clock; None:
        now); returns the backoff it started in seconds, or None when it started none (below the
        threshold, or the attempt was in flight when the current backoff began)."""
        key = (provider, model)
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = _State()
        cfg = self.config
        now = self.clock()
        started = now if started is None else started
        failures, until = state.failures, state.until
        jitter = 1.0
        in_flight = until > 0.0 and started < state.since  # when the current backoff began
        if cfg.jitter and failures + 1 >= cfg.failure_threshold and not in_flight:
            jitter += cfg.jitter * (2.0 * self._rng.random() - 1.0)  # drawn only for a new step
        state.failures, state.until, state.since, backoff = backoff_step(
            failures, until, state.since, cfg, retry_after, now, started, jitter
        )
        if backoff is None:
            if state.until != until:
                self.version += 1  # an in-flight failure's Retry-After lengthened the backoff
            return None
        state.probes.clear()
        self.version += 1
        logger.warning(
            "model backed off",
            extra={
                "provider": provider,
                "model": model,
                "consecutive_failures": state.failures,
                "backoff_seconds": round(backoff, 3),
            },
        )
        return backoff

    def merge(
        self, snapshot: Mapping[Key, tuple[int, float]], offset: float, *, complete: bool
    ) -> None:
        """Adopt fleet-wide state: `snapshot` maps keys to (consecutive failures, backoff end or
        0.0) on a clock that is `offset` seconds behind ours. With `complete`, keys missing from
        it are forgotten (another instance saw them succeed). Probes in flight are kept."""
        changed = False
        now = self.clock()
        for key, (failures, until) in snapshot.items():
            local_until = until + offset if until else 0.0
            state = self._states.get(key)
            if state is None:
                state = self._states[key] = _State()
            before = self._evaluate(state, now)[0]
            if local_until != state.until:
                # A backoff the fleet began: its start is not shared, so it counts from now
                # (failures in flight here then step nothing up; the store decides anyway).
                state.since = now if local_until else 0.0
            state.failures = failures
            state.until = local_until
            changed = changed or before != self._evaluate(state, now)[0]
        if complete:
            for key in [k for k in self._states if k not in snapshot]:
                state = self._states.pop(key)
                changed = changed or not self._evaluate(state, now)[0]
        if changed:
            self.version += 1

    # -- internals ----------------------------------------------------------------------------

    def _expire_probes(self, state: _State, now: float) -> None:
        if state.probes and now - state.probes[0] >= self.config.probe_timeout:
            cutoff = now - self.config.probe_timeout
            state.probes = [t for t in state.probes if t > cutoff]

    def _evaluate(self, state: _State, now: float) -> tuple[bool, float]:
        if now < state.until:
            return False, state.until
        if not state.until:  # failures below the threshold: still in rotation
            return True, math.inf
        self._expire_probes(state, now)
        if len(state.probes) < self.config.half_open_probes:
            return True, math.inf
        return False, state.probes[0] + self.config.probe_timeout
