"""The retry budget: retries may add only a fraction to the requests in flight.

Without it, a broad outage doubles the load on the providers that are left: every request that
fails is sent again. Like Envoy's retry budget, retries in flight are capped at `ratio` of the
routed requests in flight, but never below `min_concurrency`.
"""

from __future__ import annotations


class RetryBudget:
    __slots__ = ("active", "min_concurrency", "ratio", "retrying")

    def __init__(self, ratio: float = 0.2, min_concurrency: int = 3) -> None:
        if not ratio >= 0:
            raise ValueError(f"retry_budget must be >= 0, got {ratio!r}")
        if min_concurrency < 0:
            raise ValueError(f"retry_budget_min must be >= 0, got {min_concurrency!r}")
        self.ratio = ratio
        self.min_concurrency = min_concurrency
        self.active = 0  # routed requests in flight
        self.retrying = 0  # retry attempts in flight

    def try_retry(self) -> bool:
        """Take a retry slot if the budget allows one now; `done()` gives it back."""
        if self.retrying >= max(self.min_concurrency, self.ratio * self.active):
            return False
        self.retrying += 1
        return True

    def done(self) -> None:
        self.retrying -= 1
