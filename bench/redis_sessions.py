#!/usr/bin/env python
"""Benchmark: TierRoutingMiddleware on Redis over HTTP: requests/s and Redis commands per request.

A minimal Starlette chat endpoint (reads the body, echoes the model it was given) behind
TierRoutingMiddleware(redis_url=...) runs under uvicorn (uvloop + httptools when installed, one
worker, access log off) in a subprocess on a free 127.0.0.1 port. A built-in asyncio load
generator (raw asyncio streams, HTTP/1.1 keep-alive, one request in flight per connection) drives
it for three variants, each on a fresh server process:

* ``no-session``     -- requests name a tier but carry no session header (Redis not needed).
* ``session``        -- every request carries ``X-Session-Id``; each connection cycles through a
                        few session ids of its own (sticky sessions on Redis).
* ``session+health`` -- the same, with ``shared_health=True`` (fleet-wide health on Redis,
                        default ``health_sync_interval`` of 1 s).

For each: requests/s over the measured window, latency percentiles (sampled), and Redis commands
per request from ``INFO commandstats`` deltas over that same window divided by the requests
completed in it, in total and per command (getex, set, hgetall, evalsha, ...). The benchmark's
own INFO calls are left out.

Redis: a redis-server of its own on a free loopback port (``redis-server`` on PATH, or
REDIS_SERVER), unless ``--redis-url`` names one (then other clients' commands land in the counts
too, and keys are written under a unique prefix and deleted at the end).

CPU pinning (Linux, two or more CPUs): the server under test gets a CPU of its own; the load
generator (this process) and redis-server share another. The output says what was done.

    python bench/redis_sessions.py            # 2 s warm-up + 10 s measured per variant (~45 s)
    python bench/redis_sessions.py --quick    # 1 s warm-up + 3 s measured per variant (~20 s)

A script, not a test: it always exits 0 unless something failed to run. Only loopback is used;
every process it starts is stopped in a ``finally`` (and asked by the kernel to die with it).
"""

from __future__ import annotations

import os
import sys

# `python bench/redis_sessions.py` puts bench/ first on sys.path, where a sibling script's name could
# shadow a stdlib module: move it last, so that only bench/_support.py is found there.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.append(sys.path.pop(0))

import argparse
import asyncio
import importlib.util
import json
import logging
import platform
import subprocess
import tempfile
import time
from typing import Any

from _support import (
    HOST,
    SIMPLE_MODELS,
    START_TIMEOUT,
    child_setup,
    cpu_seconds,
    free_port,
    start_redis,
    stop,
    tier_config,
    wait_listening,
)

CHAT_PATH = "/v1/chat/completions"
CONNECTIONS = 32
SESSIONS_PER_CONNECTION = 4
VARIANTS = ("no-session", "session", "session+health")
CONFIG = tier_config("redis-sessions")
BODY = json.dumps(
    {
        "tier": "simple",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Summarise the plot of Hamlet in two sentences."},
        ],
        "max_tokens": 128,
    }
).encode()
AUTH = "Bearer sk-bench-0000000000000000000000000000"
# Commands the measuring client sends itself (connection handshake, the INFO queries).
MEASURING = frozenset({"info", "hello", "client", "ping", "select", "command"})


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# -- the server under test (child process) ---------------------------------------------------------


def build_app(variant: str, redis_url: str, prefix: str) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from tier_middleware import TierRoutingMiddleware

    async def chat(request: Request) -> JSONResponse:
        body = json.loads(await request.body())
        return JSONResponse({"object": "chat.completion", "model": body.get("model")})

    inner = Starlette(routes=[Route(CHAT_PATH, chat, methods=["POST"])])
    return TierRoutingMiddleware(
        inner,
        config=CONFIG,
        routes=[CHAT_PATH],
        redis_url=redis_url,
        redis_options={"prefix": prefix},
        shared_health=variant == "session+health",
    )


class ExtraFormatter(logging.Formatter):
    """Appends a record's `extra` fields (the middleware logs its details there)."""

    _standard = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message"}

    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in vars(record).items() if k not in self._standard}
        text = super().format(record)
        return f"{text} {extra}" if extra else text


def serve(variant: str, port: int, redis_url: str, prefix: str) -> None:
    """Child process: one uvicorn worker for one variant (the hidden --serve flag)."""
    import uvicorn

    # The middleware's warnings (a failing Redis, say) with their fields, on stderr.
    handler = logging.StreamHandler()
    handler.setFormatter(ExtraFormatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("tier_middleware")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    uvicorn.run(
        build_app(variant, redis_url, prefix),
        host=HOST,
        port=port,
        loop="uvloop" if has("uvloop") else "asyncio",
        http="httptools" if has("httptools") else "h11",
        workers=1,
        access_log=False,
        log_level="warning",
        lifespan="on",  # the middleware closes its Redis pool at shutdown
        timeout_graceful_shutdown=3,
    )


# -- processes -------------------------------------------------------------------------------------


def start_server(
    variant: str, port: int, redis_url: str, prefix: str, cpu: int | None, log: str
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--serve", variant, "--port", str(port),
        "--redis-url", redis_url, "--prefix", prefix,
    ]  # fmt: skip
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, preexec_fn=child_setup(cpu)
        )


# -- the load generator (this process) -------------------------------------------------------------


def requests_for(connection: int, variant: str, port: int) -> list[bytes]:
    """The raw requests one connection cycles through (one per session id it owns)."""
    head = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: application/json\r\nAuthorization: {AUTH}\r\n"
        f"Content-Length: {len(BODY)}\r\n"
    )
    if variant == "no-session":
        return [(head + "\r\n").encode() + BODY]
    return [
        (head + f"X-Session-Id: bench-{connection}-{k}\r\n\r\n").encode() + BODY
        for k in range(SESSIONS_PER_CONNECTION)
    ]


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    i = lower.index(b"content-length:") + 15
    length = int(lower[i : lower.index(b"\r\n", i)])
    return head, await reader.readexactly(length)


async def check(port: int, variant: str) -> None:
    """One request: 200, routed to a simple-tier model, the body rewritten to name it."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(requests_for(999, variant, port)[0])
        head, payload = await asyncio.wait_for(read_response(reader), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    text = head.decode("latin-1").lower()
    model = json.loads(payload).get("model")
    if not text.startswith("http/1.1 200") or "x-tier: simple" not in text:
        raise RuntimeError(f"{variant}: unexpected answer {head!r} {payload!r}")
    if model not in SIMPLE_MODELS or f"x-tier-model: {model}".lower() not in text:
        raise RuntimeError(f"{variant}: the body was not rewritten: {payload!r}")


async def commandstats(client: Any) -> dict[str, int]:
    stats = await client.info("commandstats")
    counts = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    return {name: n for name, n in counts.items() if name not in MEASURING}


async def drive(
    port: int,
    variant: str,
    redis_url: str,
    prefix: str,
    warmup: float,
    seconds: float,
    pids: dict[str, int | None],
) -> dict[str, Any]:
    from redis.asyncio import Redis

    streams = [requests_for(c, variant, port) for c in range(CONNECTIONS)]
    counts = [0] * CONNECTIONS
    bad = [0] * CONNECTIONS
    latencies: list[float] = []
    measuring = False

    async def worker(c: int) -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        mine = streams[c]
        n = 0
        try:
            while True:
                started = time.perf_counter()
                writer.write(mine[n % len(mine)])
                n += 1
                head, _ = await read_response(reader)
                if measuring:
                    counts[c] += 1
                    if not head.startswith(b"HTTP/1.1 200"):
                        bad[c] += 1
                    if counts[c] % 8 == 0:
                        latencies.append(time.perf_counter() - started)
        finally:
            writer.close()

    async with Redis.from_url(redis_url, socket_timeout=5) as stats_client:
        await stats_client.ping()  # connect now, not inside the window
        tasks = [asyncio.create_task(worker(c)) for c in range(CONNECTIONS)]
        try:
            await asyncio.sleep(warmup)
            for task in tasks:
                if task.done():
                    task.result()  # a worker that died: raise its error
            before = await commandstats(stats_client)
            cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            gen_before = time.process_time()
            measuring = True
            t0 = time.perf_counter()
            await asyncio.sleep(seconds)
            measuring = False
            elapsed = time.perf_counter() - t0
            total = sum(counts)
            gen_cpu = time.process_time() - gen_before
            cpu_after = {name: cpu_seconds(pid) for name, pid in pids.items()}
            after = await commandstats(stats_client)
            for task in tasks:
                if task.done():
                    task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        sessions = 0
        async for _ in stats_client.scan_iter(match=f"{prefix}s:*", count=1000):
            sessions += 1
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    delta = {k: v for k, v in delta.items() if v}
    latencies.sort()

    def pct(p: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else 0
        )

    return {
        "requests": total,
        "rps": total / elapsed,
        "non200": sum(bad),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "commands": delta,
        "sessions": sessions,
        "elapsed": elapsed,
        "cpu": {
            "server": _used(cpu_before["server"], cpu_after["server"]),
            "load generator": gen_cpu,
            "redis-server": _used(cpu_before.get("redis"), cpu_after.get("redis")),
        },
    }


def _used(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


async def cleanup(redis_url: str, prefix: str) -> None:
    from redis.asyncio import Redis

    async with Redis.from_url(redis_url, socket_timeout=5) as client:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)


def run_variant(
    variant: str,
    redis_url: str,
    run_id: str,
    server_cpu: int | None,
    warmup: float,
    seconds: float,
    redis_pid: int | None,
    workdir: str,
) -> dict[str, Any]:
    prefix = f"bench:{run_id}:{variant}:"
    port = free_port()
    log = os.path.join(workdir, f"server-{variant}.log")
    proc = start_server(variant, port, redis_url, prefix, server_cpu, log)
    try:
        wait_listening(proc, port)

        async def go() -> dict[str, Any]:
            await check(port, variant)
            pids = {"server": proc.pid, "redis": redis_pid}
            return await drive(port, variant, redis_url, prefix, warmup, seconds, pids)

        result: dict[str, Any] = run_loop(go(), timeout=START_TIMEOUT + warmup + seconds + 30)
    finally:
        stop(proc)
        if redis_pid is None:  # not our server: leave nothing behind
            run_loop(cleanup(redis_url, prefix), timeout=30)
    with open(log, errors="replace") as f:
        result["server_log"] = [line.rstrip() for line in f if line.strip()]
    return result


def run_loop(coro: Any, timeout: float) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    if has("uvloop"):
        import uvloop

        return uvloop.run(bounded())
    return asyncio.run(bounded())


# -- reporting -------------------------------------------------------------------------------------


def redis_version(redis_url: str) -> str:
    async def ask() -> str:
        from redis.asyncio import Redis

        async with Redis.from_url(redis_url, socket_timeout=5) as client:
            return str((await client.info("server"))["redis_version"])

    return str(run_loop(ask(), timeout=10))


def report(results: dict[str, dict[str, Any]]) -> None:
    print()
    print(
        f"{'variant':<16} {'req/s':>9} {'requests':>9} {'non-200':>8} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'redis cmd/req':>14}  per command (calls per request)"
    )
    for variant, res in results.items():
        n = max(res["requests"], 1)
        commands = res["commands"]
        per = sum(commands.values()) / n
        detail = ", ".join(
            f"{name} {calls / n:.4f}"
            for name, calls in sorted(commands.items(), key=lambda kv: (-kv[1], kv[0]))
        )
        print(
            f"{variant:<16} {res['rps']:>9.0f} {res['requests']:>9} {res['non200']:>8} "
            f"{res['p50_ms']:>7.2f} {res['p99_ms']:>7.2f} {per:>14.4f}  {detail or '-'}"
        )
    base = results.get("no-session")
    if base:
        for variant in VARIANTS[1:]:
            if variant in results:
                ratio = results[variant]["rps"] / base["rps"]
                print(f"  {variant} / no-session throughput: {ratio:.3f}")
    print()
    print("CPU used during the measured window (share of one CPU; microseconds per request):")
    for variant, res in results.items():
        n = max(res["requests"], 1)
        parts = []
        for name, used in res["cpu"].items():
            if used is not None:
                parts.append(
                    f"{name} {used / res['elapsed'] * 100:.0f}% ({used / n * 1e6:.0f} us/req)"
                )
        print(f"  {variant:<16} " + ", ".join(parts))
    busy = [v for v, r in results.items() if (r["cpu"]["server"] or 0) < 0.8 * r["elapsed"]]
    if busy:
        print(
            f"  NOTE: the server used < 80% of its CPU in {', '.join(busy)}: it was not the "
            "bottleneck (other load on the machine? see the load average) -- compare with care"
        )
    sessions = {v: r["sessions"] for v, r in results.items() if v != "no-session"}
    if sessions:
        print(
            "  session keys in Redis after each run: "
            + ", ".join(f"{v} {n}" for v, n in sessions.items())
            + f" (expected {CONNECTIONS * SESSIONS_PER_CONNECTION} + 1 from the check request)"
        )
    for variant, res in results.items():
        for line in res["server_log"]:
            print(f"  server log ({variant}): {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 s warm-up, 3 s measured")
    parser.add_argument("--seconds", type=float, help="measured seconds per variant (10)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per variant (2)")
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default="tier:", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve:
        serve(args.serve, args.port, args.redis_url, args.prefix)
        return 0

    seconds = args.seconds if args.seconds is not None else (3.0 if args.quick else 10.0)
    warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    server_cpu, gen_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)

    import redis
    import starlette
    import uvicorn

    print(
        f"Python {platform.python_version()} ({platform.machine()}), starlette "
        f"{starlette.__version__}, uvicorn {uvicorn.__version__}, redis-py {redis.__version__}, "
        f"{os.cpu_count()} CPUs"
    )
    loop_name = "uvloop" if has("uvloop") else "asyncio"
    http_name = "httptools" if has("httptools") else "h11"
    print(f"server: uvicorn loop={loop_name} http={http_name}, 1 worker, access log off, {HOST}")
    print(
        f"load: built-in asyncio generator ({loop_name}), {CONNECTIONS} keep-alive connections, "
        f"{len(BODY)} B chat body, tier 'simple'; session variants: "
        f"{SESSIONS_PER_CONNECTION} session ids per connection, used in turn"
    )
    print(f"per variant: fresh server, {warmup:g} s warm-up, then {seconds:g} s measured")
    print(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    redis_proc: subprocess.Popen[bytes] | None = None
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="tier-bench-redis-") as workdir:
        try:
            if args.redis_url:
                redis_url, own = args.redis_url, False
                where = "the given --redis-url (commands of other clients are counted too)"
            else:
                redis_proc, redis_port = start_redis(workdir, gen_cpu)
                redis_url = f"redis://{HOST}:{redis_port}/0"
                own = True
                where = f"own redis-server at {redis_url}"
            print(f"redis: {where}, version {redis_version(redis_url)}")
            if server_cpu is None:
                print("CPU pinning: unavailable (fewer than 2 CPUs); everything shares CPUs")
            else:
                os.sched_setaffinity(0, {gen_cpu})  # type: ignore[arg-type]
                redis_pin = "with redis-server" if own else "(external redis not pinned)"
                print(
                    f"CPU pinning: server under test on CPU {server_cpu}; load generator "
                    f"on CPU {gen_cpu} {redis_pin}"
                )
            run_id = f"{os.getpid()}-{int(time.time())}"
            for variant in args.variants:
                redis_pid = redis_proc.pid if redis_proc is not None else None
                res = run_variant(
                    variant, redis_url, run_id, server_cpu, warmup, seconds, redis_pid, workdir
                )
                results[variant] = res
                print(
                    f"  {variant}: {res['rps']:.0f} req/s over {res['requests']} requests",
                    flush=True,
                )
        finally:
            stop(redis_proc)
    report(results)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
