"""What UpstreamTransport adds to a provider call.

Run: python bench/upstream.py [--repeats 9] [--batch 20000]

Three figures, each the median over `repeats` batches of back-to-back awaits (perf_counter_ns
around the batch, divided by its size), all in one run so that their ratios hold on a noisy VM:

- outside a routed request: `UpstreamTransport(inner).handle_async_request(request)` against
  `inner.handle_async_request(request)`, where `inner` answers a ready-made response at once, so
  the difference is the transport's own cost (target: well under 5 us);
- the same inside a routed request's attempt (the call is reported to the attempt; no dispatch
  table, so the call goes where the SDK sent it);
- a whole `openai` SDK call (`chat.completions.create` against an httpx2 MockTransport) with and
  without the transport, outside a routed request: the transport's share of a real SDK call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parent))  # bench/ last: the package comes first

import httpx2

from tier_middleware import TierRoutingMiddleware, UpstreamTransport
from tier_middleware._attempt import Attempt, current_attempt

CONFIG = {
    "tiers": {
        "simple": [{"provider": "openai", "model": "gpt-4o-mini", "relative_cost": 1}],
        "moderate": [{"provider": "openai", "model": "gpt-4o", "relative_cost": 5}],
        "complex": [{"provider": "anthropic", "model": "claude-opus-4", "relative_cost": 20}],
    }
}
COMPLETION = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "gpt-4o-mini",
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }
).encode()


class Instant:
    """An inner transport that answers a ready-made 200 at once."""

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=COMPLETION, request=request)

    async def aclose(self) -> None:
        pass


async def per_call_us(calls: list[Any], repeats: int, batch: int) -> list[float]:
    """Median us per call of each of `calls`, measured in turns (one batch of each per round),
    so that a slow spell of the machine hits them all alike."""
    for call in calls:
        for _ in range(batch // 10):  # warm-up
            await call()
    samples: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for call, out in zip(calls, samples, strict=True):
            start = time.perf_counter_ns()
            for _ in range(batch):
                await call()
            out.append((time.perf_counter_ns() - start) / batch / 1000)
    return [statistics.median(out) for out in samples]


def an_attempt() -> Attempt:
    """A routed request's attempt, as the middleware makes one (no app is called)."""
    from tier_middleware._exchange import Exchange
    from tier_middleware._routes import RoutePolicy

    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    mw = TierRoutingMiddleware(app, config=CONFIG, routes=["/v1/chat/completions"])
    scope = {"type": "http", "path": "/v1/chat/completions", "headers": [], "state": {}}
    exchange = Exchange(mw, scope, None, None, RoutePolicy())  # type: ignore[arg-type]
    assert mw.router is not None
    return Attempt(exchange, mw.router.select_now("simple"), False)


async def main(repeats: int, batch: int) -> None:
    inner = Instant()
    transport = UpstreamTransport(inner)
    request = httpx2.Request("POST", "http://provider/v1/chat/completions", content=b"{}")

    async def direct() -> Any:
        return await inner.handle_async_request(request)

    async def wrapped() -> Any:
        return await transport.handle_async_request(request)

    attempt = an_attempt()

    async def routed() -> Any:
        token = current_attempt.set(attempt)  # what the middleware does around the app
        try:
            return await transport.handle_async_request(request)
        finally:
            current_attempt.reset(token)

    async def unrouted_baseline() -> Any:  # the same contextvar work, without the transport
        token = current_attempt.set(attempt)
        try:
            return await inner.handle_async_request(request)
        finally:
            current_attempt.reset(token)

    bare, outside, base_in, inside = await per_call_us(
        [direct, wrapped, unrouted_baseline, routed], repeats, batch
    )

    import openai

    def sdk(transport: Any) -> Any:
        http = httpx2.AsyncClient(transport=transport)
        client = openai.AsyncOpenAI(
            api_key="sk", base_url="http://provider/v1", max_retries=0, http_client=http
        )
        messages = [{"role": "user", "content": "hi"}]

        async def call() -> Any:
            return await client.chat.completions.create(model="gpt-4o-mini", messages=messages)  # type: ignore[arg-type]

        return call

    sdk_batch = max(200, batch // 50)
    sdk_bare, sdk_wrapped = await per_call_us(
        [sdk(Instant()), sdk(UpstreamTransport(Instant()))], repeats, sdk_batch
    )

    print(f"inner transport alone                     {bare:8.3f} us per call")
    print(f"through UpstreamTransport, not routed     {outside:8.3f} us  (+{outside - bare:.3f})")
    print(f"through UpstreamTransport, in an attempt  {inside:8.3f} us  (+{inside - base_in:.3f})")
    print(f"openai SDK call, plain client             {sdk_bare:8.1f} us per call")
    print(
        f"openai SDK call, UpstreamTransport        {sdk_wrapped:8.1f} us  "
        f"(+{sdk_wrapped - sdk_bare:.1f}, {100 * (sdk_wrapped - sdk_bare) / sdk_bare:+.1f} %)"
    )
    print("target: the not-routed figure adds well under 5 us")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch", type=int, default=20_000)
    args = parser.parse_args()
    asyncio.run(main(args.repeats, args.batch))
