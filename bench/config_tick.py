"""Cost of `ConfigManager.tick()`, the config check every routed request makes when the config
comes from a control plane: one clock read and a compare while nothing is due.

Run: python bench/config_tick.py

Target: well under 1 us (it used to be a timed unit test; wall-clock bounds belong here).
Timed on a manager of a static config, whose refresh is never due: `tick()` runs the same
clock read and compare as a control plane's between refreshes, and starts nothing.
"""

from __future__ import annotations

import time

from _support import tier_config

from tier_middleware._config_manager import ConfigManager


def best_ns(calls: int = 100_000, rounds: int = 7) -> float:
    manager = ConfigManager(tier_config("bench"), clock=time.monotonic)
    tick = manager.tick
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(calls):
            tick()
        best = min(best, (time.perf_counter_ns() - start) / calls)
    assert not manager.refreshing
    return best


def main() -> None:
    ns = best_ns()
    verdict = "PASS" if ns < 1000 else "MISS"
    print(f"ConfigManager.tick(), nothing due: {ns:.0f} ns per call (target < 1000 ns): {verdict}")


if __name__ == "__main__":
    main()
