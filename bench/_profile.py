"""--profile: where the added microseconds go. A cProfile of the routed path; the bytecodes and
Python calls executed per request, by function (exact, and the same on any machine); ablations
(one piece of the middleware switched off at a time); the requests with cold CPU caches.

The helpers here drive an app that never suspends without an event loop (`drive`): everything in
this file is the driver, and the counts leave it out.
"""

from __future__ import annotations

import importlib
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from _apps import (
    BODY_MODEL,
    BODY_TIER,
    CHAT_PATH,
    CONFIG,
    build_app,
    reference_middleware,
    scope_template,
    trivial_app,
)
from _inprocess import make_runner
from _support import run_loop

from tier_middleware import TierRoutingMiddleware


def drive(coro: Any) -> Any:
    """Run a coroutine that never suspends (every await returns at once) without a loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("coroutine suspended")


def best_us(fn: Callable[[], Any], number: int = 20000, repeat: int = 7) -> float:
    """Best-of-`repeat` microseconds per call (timeit: GC off, which this path never needs:
    a request frees what it allocates, so no collection runs in steady state)."""
    import timeit

    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def receiver(body: bytes) -> Callable[[], Any]:
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return pending.pop() if pending else {"type": "http.disconnect"}

    return receive


async def nop_send(message: Any) -> None:
    return None


def status_of(app: Any, body: bytes) -> int | None:
    """The status one request of `app` answers (None if it sent no response start)."""
    starts: list[int] = []

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            starts.append(message["status"])

    drive(app(scope_template(body), receiver(body), send))
    return starts[0] if starts else None


def driven_us(app: Any, body: bytes, number: int = 10000) -> float:
    """us per request of `app` (Starlette or raw ASGI) driven by hand, no event loop."""
    template = scope_template(body)

    def one() -> None:
        drive(app(dict(template), receiver(body), nop_send))

    for _ in range(2000):
        one()
    return best_us(one, number=number)


def profile(iterations: int) -> None:
    """Where the added microseconds go: cProfile, bytecodes per request, ablations, cold caches."""
    import cProfile
    import pstats

    print("\n== profile 1: cProfile of the middleware variant in process (top 22 by tottime) ==")
    runner = make_runner("middleware")
    run_loop(runner(2000))
    prof = cProfile.Profile()

    async def go() -> None:
        prof.enable()
        await runner(iterations)
        prof.disable()

    run_loop(go())
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)
    _opcodes()
    _ablations()
    _cold(build_app("bare"), build_app("middleware"))


# What the counts leave out: the driver (all of this file) and the inner app.
DRIVER = ("_profile.py:", "_apps.py:trivial_app")


def bytecode_counts(
    app: Any, body: bytes, requests: int = 200
) -> tuple[float, float, Counter[str]]:
    """Bytecodes and Python calls executed per request by `app` (around `trivial_app`), and the
    bytecodes per request by function: exact and the same on any machine, so they show a change
    in the Python work where timings on a shared VM cannot."""
    template = scope_template(body)
    for _ in range(50):
        drive(app(dict(template), receiver(body), nop_send))
    counts: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    sys.settrace(_counting(counts, calls))
    try:
        for _ in range(requests):
            drive(app(dict(template), receiver(body), nop_send))
    finally:
        sys.settrace(None)
    own = Counter({k: v / requests for k, v in counts.items() if not k.startswith(DRIVER)})
    own_calls = sum(v for k, v in calls.items() if not k.startswith(DRIVER)) / requests
    return sum(own.values()), own_calls, own


def counted_apps() -> dict[str, tuple[Any, bytes]]:
    """The apps whose work is counted: the routed middleware and the reference, each around
    `trivial_app`, with the body they route."""
    return {
        "middleware": (
            TierRoutingMiddleware(trivial_app, config=CONFIG, routes=[CHAT_PATH]),
            BODY_TIER,
        ),
        "reference": (reference_middleware(trivial_app), BODY_TIER),
    }


def _opcodes() -> None:
    print("\n== profile 2: bytecodes per request around a trivial ASGI app (exact counts) ==")
    for name, (app, body) in counted_apps().items():
        total, calls, by_function = bytecode_counts(app, body)
        print(f"  {name}: {total:.0f} bytecodes in {calls:.0f} Python calls per request")
        if name == "middleware":
            for key, n in by_function.most_common(12):
                print(f"    {n:6.0f}  {key}")


def _counting(counts: Any, calls: Any) -> Any:
    """A trace function counting bytecodes and calls per function into the two Counters."""

    def trace(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        code = frame.f_code
        key = f"{os.path.basename(code.co_filename)}:{code.co_name}"
        if event == "call":
            calls[key] += 1
        elif event == "opcode":
            counts[key] += 1
        return trace

    return trace


# One piece of the middleware switched off at a time: (what is off, module, name, stand-in).
# These are private names, which a change of layout may move: an ablation whose name is gone is
# skipped with a note (then update it here) rather than crash the run.
ABLATIONS: tuple[tuple[str, str, str, Any], ...] = (
    ("without usage accounting", "tier_middleware._attempt", "JsonUsageTap", lambda: None),
)


def _ablations() -> None:
    """The middleware around a trivial ASGI app, with one piece switched off at a time."""
    print("\n== profile 3: ablations around a trivial ASGI app (us per request, best of 3) ==")

    def added() -> float:
        mw = TierRoutingMiddleware(trivial_app, config=CONFIG, routes=[CHAT_PATH])
        status = status_of(mw, BODY_TIER)
        if status != 200:
            raise RuntimeError(f"the request answered {status}")
        return min(driven_us(mw, BODY_TIER) for _ in range(3)) - bare

    bare = min(driven_us(trivial_app, BODY_MODEL) for _ in range(3))
    print(f"  {'everything on':<44}{added():+7.2f}")
    for label, module_name, name, stand_in in ABLATIONS:
        try:
            module = importlib.import_module(module_name)
            original = getattr(module, name)
        except (ImportError, AttributeError) as exc:
            print(f"  {label:<44}skipped: {module_name}.{name} is gone ({exc.__class__.__name__})")
            continue
        setattr(module, name, stand_in)
        try:
            print(f"  {label:<44}{added():+7.2f}")
        except Exception as exc:
            print(f"  {label:<44}skipped: with {module_name}.{name} replaced, {exc!r}")
        finally:
            setattr(module, name, original)
    ref = min(driven_us(reference_middleware(trivial_app), BODY_TIER) for _ in range(3)) - bare
    print(f"  {'reference (the mandatory work only)':<44}{ref:+7.2f}")


def _cold(bare_app: Any, mw_app: Any, wipe_mb: int = 32, requests: int = 300) -> None:
    """The same Starlette requests one at a time, with the CPU caches overwritten in between
    (as the kernel, the network stack and 31 other connections do to a real server), timed
    one by one."""
    import ctypes

    wipe = bytearray(wipe_mb << 20)
    address = ctypes.addressof(ctypes.c_char.from_buffer(wipe))
    medians = {}
    for name, app, body in (("bare", bare_app, BODY_MODEL), ("middleware", mw_app, BODY_TIER)):
        template = scope_template(body)
        times = []
        for i in range(requests):
            ctypes.memset(address, i & 0xFF, len(wipe))
            scope, receive = dict(template), receiver(body)
            t0 = time.perf_counter_ns()
            drive(app(scope, receive, nop_send))
            times.append(time.perf_counter_ns() - t0)
        medians[name] = statistics.median(times) / 1000
    del wipe
    print(
        f"  cold caches ({wipe_mb} MB overwritten before each request, median of {requests}): "
        f"bare {medians['bare']:.1f} us, middleware {medians['middleware']:.1f} us, "
        f"added {medians['middleware'] - medians['bare']:+.1f} us"
    )
