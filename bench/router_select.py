"""Median cost of one `await router.select(tier)` for 3, 30 and 1,000 models per tier.

Run: python bench/router_select.py [--repeats 15] [--batch 20000]

Each figure is the median over `repeats` batches of back-to-back awaits (timed with
time.perf_counter_ns around the whole batch, divided by the batch size; batches hold `batch`
calls, fewer for slow calls so that one batch takes about 50 ms), on the real
time.monotonic clock and a healthy tracker, i.e. the steady state where the per-tier pool is
cached. Targets: <= 5 us at 3 models; 1,000 models no more than 3x the 3-model figure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from tier_middleware import TierRouter

SIZES = (3, 30, 1000)
PROVIDERS = ("openai", "anthropic", "google", "azure", "mistral")


def make_router(models_per_tier: int) -> TierRouter:
    import random

    from tier_middleware import HealthTracker, TierConfig, TierRouter

    def tier(offset: int) -> list[dict[str, Any]]:
        return [
            {
                "provider": PROVIDERS[i % len(PROVIDERS)],
                "model": f"model-{i}",
                "relative_cost": 1 + (i + offset) % 20,
            }
            for i in range(models_per_tier)
        ]

    config = TierConfig.load(
        {"tiers": {"simple": tier(0), "moderate": tier(1), "complex": tier(2)}}
    )
    return TierRouter(config, HealthTracker(), rng=random.Random(0))


async def median_us(call: Callable[[], Awaitable[object]], repeats: int, batch: int) -> float:
    import gc
    import statistics
    import time

    for _ in range(1000):  # warm up: builds and caches the pools
        await call()
    # Shrink the batch for slow calls so one repeat stays around 50 ms.
    start = time.perf_counter_ns()
    for _ in range(200):
        await call()
    estimate_ns = (time.perf_counter_ns() - start) / 200
    batch = max(200, min(batch, int(50e6 / max(estimate_ns, 1.0))))
    per_call = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.perf_counter_ns()
            for _ in range(batch):
                await call()
            per_call.append((time.perf_counter_ns() - start) / batch / 1000)
    finally:
        if gc_was_enabled:
            gc.enable()
    return statistics.median(per_call)


async def run(repeats: int, batch: int) -> None:
    print(f"select() median per call, {repeats} repeats x up to {batch} calls each (asyncio)")
    plain: dict[int, float] = {}
    for n in SIZES:
        router = make_router(n)
        plain[n] = await median_us(lambda r=router: r.select("simple"), repeats, batch)
        print(f"  {n:>5} models per tier:                 {plain[n]:7.2f} us")
    ratio = plain[1000] / plain[3]
    print(f"  ratio 1000/3:                           {ratio:7.2f}x")

    for n in (3, 1000):
        router = make_router(n)
        preferred = await median_us(
            lambda r=router: r.select("simple", preferred_provider="anthropic"), repeats, batch
        )
        print(f"  {n:>5} models, preferred_provider:       {preferred:7.2f} us")
    for n in (3, 1000):
        router = make_router(n)
        excluded = [("openai", "model-0")]
        exclude = await median_us(
            lambda r=router, e=excluded: r.select("simple", exclude=e), repeats, batch
        )
        print(f"  {n:>5} models, exclude one pair:        {exclude:7.2f} us")

    ok_small = plain[3] <= 5.0
    ok_ratio = ratio <= 3.0
    print(
        f"targets: 3 models <= 5 us: {'PASS' if ok_small else 'FAIL'}; "
        f"1000/3 <= 3x: {'PASS' if ok_ratio else 'FAIL'}"
    )


def main() -> None:
    import argparse
    import asyncio

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=20_000)
    args = parser.parse_args()
    asyncio.run(run(args.repeats, args.batch))


if __name__ == "__main__":
    main()
