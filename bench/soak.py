#!/usr/bin/env python
"""Soak: TierRoutingMiddleware at a steady request rate for a minute. Does anything grow?

A Starlette chat app behind TierRoutingMiddleware (sessions on Redis, ``shared_health=True``)
runs under uvicorn in a subprocess on a free 127.0.0.1 port, with a redis-server of its own on
another free loopback port. This process paces requests at ``--rate`` per second (open loop: a
request is sent on schedule whether or not earlier ones have been answered, up to a bound on
those in flight) for ``--seconds``, over a pool of keep-alive connections. The mix:

* 90 % plain chat completions, 8 % streamed (SSE, five chunks), 2 % streamed where the client
  hangs up after the first chunk (a disconnect mid-stream: the connection is dropped);
* every request carries ``X-Session-Id``: conversations of 1-8 requests, about one in seven
  moving up a tier (new sessions, sticky reads and upgrades on Redis);
* the app answers 503 for 0.5 % of calls (the middleware retries them on another model and
  records the failure in Redis's shared health).

Every 5 s it samples the server process: resident memory (VmRSS in /proc/PID/status), open file
descriptors (entries of /proc/PID/fd), and, from the app's debug endpoint, the number of asyncio
tasks (``len(asyncio.all_tasks())``) and of objects tracked by the garbage collector. It prints a
table and a verdict: RSS growth from the 20 s mark (half-way in runs under 40 s) to the end,
and whether the fd and task counts stayed flat after that mark. Latencies are measured from the
moment a request was due, so a late send counts against them.

Run from the repository root with the project's venv active:

    python bench/soak.py                    # 60 s at 300 requests/s
    python bench/soak.py --quick            # 15 s
    python bench/soak.py --seconds 300 --rate 500

A script, not a test: it exits 0 whatever the verdict (``--strict`` makes a FAIL exit 1). Only
loopback is used; both processes it starts are stopped in a ``finally`` and are asked by the
kernel to die with it.
"""

from __future__ import annotations

import os
import sys

# `python bench/soak.py` puts bench/ first on sys.path, where a sibling script's name could
# shadow a stdlib module: move it last, so that only bench/_support.py is found there.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.append(sys.path.pop(0))

import argparse
import asyncio
import contextlib
import gc
import json
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from _support import HOST, START_TIMEOUT, child_setup, free_port, start_redis, stop, tier_config

CHAT_PATH = "/v1/chat/completions"
DEBUG_PATH = "/debug/soak"
SAMPLE_EVERY = 5.0  # seconds
MARK = 20.0  # growth is measured from here to the end (half-way in runs under 40 s)
CONNECTIONS = 64
MAX_IN_FLIGHT = 512  # beyond this the generator skips a beat rather than pile up without end
REQUEST_TIMEOUT = 10.0
FAIL_RATE = 0.005  # share of app calls answered 503
STREAM_SHARE, ABORT_SHARE = 0.08, 0.02
STREAM_CHUNKS, STREAM_GAP = 5, 0.01  # seconds between chunks
# Verdict limits. RSS: the allocator keeps some slack, so a little growth is not a leak.
RSS_LIMIT_MIB, RSS_LIMIT_SHARE = 2.0, 0.02
FD_SPREAD = 8  # keep-alive connections come and go (a hang-up drops one, a new one replaces it)
TASK_SPREAD = 24  # tasks include the requests in flight at the sampling instant

CONFIG = tier_config("soak")
TIERS = ("simple", "moderate", "complex")
# uvicorn's own lifecycle lines at INFO; anything else in the server's log is reported.
ROUTINE = (
    "Started server process",
    "Waiting for application startup",
    "Application startup complete",
    "Uvicorn running on",
    "Shutting down",
    "Waiting for application shutdown",
    "Application shutdown complete",
    "Finished server process",
)
PROMPT = "Summarise the attached incident report in three bullet points. " * 8


# -- the server under test (child process) ------------------------------------------------------


def build_app(redis_url: str) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    from tier_middleware import HealthConfig, TierRoutingMiddleware

    rng = random.Random(7)

    async def chat(request: Request) -> Response:
        body = await request.json()
        model = body.get("model")
        if rng.random() < FAIL_RATE:
            return JSONResponse({"error": {"code": "overloaded"}}, status_code=503)
        if body.get("stream"):

            async def events() -> Any:
                for n in range(STREAM_CHUNKS):
                    yield f"data: {json.dumps({'model': model, 'n': n})}\n\n"
                    await asyncio.sleep(STREAM_GAP)
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        usage = {"prompt_tokens": 24, "completion_tokens": 48, "total_tokens": 72}
        return JSONResponse({"object": "chat.completion", "model": model, "usage": usage})

    async def debug(request: Request) -> JSONResponse:
        return JSONResponse(
            {"tasks": len(asyncio.all_tasks()), "gc_objects": len(gc.get_objects())}
        )

    inner = Starlette(routes=[Route(CHAT_PATH, chat, methods=["POST"]), Route(DEBUG_PATH, debug)])
    return TierRoutingMiddleware(
        inner,
        config=CONFIG,
        routes=[CHAT_PATH],
        redis_url=redis_url,
        shared_health=True,
        # Three failures in a row back a model off, briefly: the run keeps every path busy.
        health=HealthConfig(initial_backoff=1.0, max_backoff=5.0, failure_threshold=3),
    )


def serve(port: int, redis_url: str) -> None:
    """Child process (the hidden --serve flag): one uvicorn worker."""
    import uvicorn

    uvicorn.run(
        build_app(redis_url),
        host=HOST,
        port=port,
        workers=1,
        access_log=False,
        log_level="info",  # startup and shutdown lines, to tell a graceful stop (no access log)
        lifespan="on",  # the middleware closes its Redis pool at shutdown
        timeout_graceful_shutdown=3,
    )


# -- processes ----------------------------------------------------------------------------------


def redis_command(port: int, *args: str) -> bytes:
    """One command over a plain socket (RESP); the raw first reply line and what follows."""
    payload = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
    with socket.create_connection((HOST, port), timeout=2.0) as sock:
        sock.sendall(payload.encode())
        return sock.recv(65536)


def start_server(port: int, redis_url: str, log: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, os.path.abspath(__file__), "--serve", "--port", str(port)]
    cmd += ["--redis-url", redis_url]
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, preexec_fn=child_setup()
        )


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0  # kB
    raise RuntimeError("no VmRSS line")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- the load generator (this process) ----------------------------------------------------------


@dataclass
class Window:
    """What happened between two samples."""

    sent: int = 0
    done: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)


@dataclass
class Sample:
    t: float
    window: Window
    rss: float
    fds: int
    tasks: int
    objects: int


class Conversations:
    """Session ids for the requests: conversations of 1-8 turns that sometimes move up a tier."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.active: list[list[Any]] = []  # [session id, tier index, turns left]
        self.started = 0

    def next(self) -> tuple[str, str]:
        rng = self.rng
        if len(self.active) < 200 or rng.random() < 0.15:
            self.started += 1
            self.active.append([f"soak-{self.started}", 0, rng.randint(1, 8)])
        convo = rng.choice(self.active)
        if convo[1] < 2 and rng.random() < 0.15:
            convo[1] += 1
        convo[2] -= 1
        if convo[2] <= 0:
            self.active.remove(convo)
        return convo[0], TIERS[convo[1]]


@dataclass
class Job:
    session: str
    tier: str
    kind: str  # plain | stream | abort
    scheduled: float  # perf_counter time it was due to be sent


def raw_request(port: int, job: Job) -> bytes:
    body: dict[str, Any] = {"tier": job.tier, "messages": [{"role": "user", "content": PROMPT}]}
    if job.kind != "plain":
        body["stream"] = True
    data = json.dumps(body).encode()
    head = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: application/json\r\nX-Session-Id: {job.session}\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


async def read_response(reader: asyncio.StreamReader, hang_up: bool) -> int:
    """Read one response (Content-Length or chunked); with `hang_up`, stop after the first
    chunk of the body. Returns the status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0 or hang_up:
                return status
    i = lower.index(b"content-length:") + 15
    await reader.readexactly(int(lower[i : lower.index(b"\r\n", i)]))
    return status


async def drive(port: int, pid: int, seconds: float, rate: float) -> list[Sample]:
    """Send requests on schedule over CONNECTIONS keep-alive connections; sample every 5 s."""
    rng = random.Random(42)
    convos = Conversations(rng)
    window = Window()
    samples: list[Sample] = []
    queue: asyncio.Queue[Job | None] = asyncio.Queue()
    busy = 0

    async def connection() -> None:
        nonlocal busy
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            while (job := await queue.get()) is not None:
                busy += 1
                try:
                    if writer is None:
                        reader, writer = await asyncio.open_connection(HOST, port)
                    assert reader is not None
                    writer.write(raw_request(port, job))
                    hang_up = job.kind == "abort"
                    status = await asyncio.wait_for(read_response(reader, hang_up), REQUEST_TIMEOUT)
                    # Latency from when the request was due: a late send counts against it.
                    window.latencies.append(time.perf_counter() - job.scheduled)
                    window.statuses[status] += 1
                    window.done += 1
                    if hang_up:  # the client leaves mid-stream: drop the connection
                        writer.close()
                        reader = writer = None
                except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                    window.errors[type(exc).__name__] += 1
                    if writer is not None:
                        writer.close()
                    reader = writer = None
                finally:
                    busy -= 1
                    queue.task_done()
        finally:
            if writer is not None:
                writer.close()

    async def sample(t: float) -> None:
        nonlocal window
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(f"GET {DEBUG_PATH} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            lower = head.lower()
            i = lower.index(b"content-length:") + 15
            debug = json.loads(await reader.readexactly(int(lower[i : lower.index(b"\r\n", i)])))
        finally:
            writer.close()
        samples.append(Sample(t, window, rss_mib(pid), fd_count(pid), **_debug(debug)))
        window = Window()

    loop = asyncio.get_running_loop()
    workers = [loop.create_task(connection()) for _ in range(CONNECTIONS)]
    try:
        await sample(0.0)
        start = loop.time()
        origin = time.perf_counter()
        next_sample = SAMPLE_EVERY
        i = 0
        while True:
            now = loop.time() - start
            if now >= next_sample and next_sample < seconds:
                await sample(next_sample)
                next_sample += SAMPLE_EVERY
                continue
            due = i / rate
            if due >= seconds:
                break
            if due > now:
                await asyncio.sleep(min(due, next_sample) - now)
                continue
            i += 1
            if busy + queue.qsize() >= MAX_IN_FLIGHT:
                window.errors["skipped (too many in flight)"] += 1
                continue
            session, tier = convos.next()
            draw = rng.random()
            kind = "abort" if draw < ABORT_SHARE else "stream" if draw < STREAM_SHARE else "plain"
            queue.put_nowait(Job(session, tier, kind, origin + due))
            window.sent += 1
        # The last answers come in; the final sample is taken with the connections still open.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(queue.join(), REQUEST_TIMEOUT + 5)
        await sample(seconds)
        for _ in workers:
            queue.put_nowait(None)  # each connection ends after what is queued
        await asyncio.wait(workers, timeout=5)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return samples


def _debug(data: dict[str, Any]) -> dict[str, int]:
    return {"tasks": int(data["tasks"]), "objects": int(data["gc_objects"])}


# -- report -------------------------------------------------------------------------------------


def ms(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.1f}"


def report(samples: list[Sample], seconds: float, rate: float) -> bool:
    print()
    head = (
        f"{'t (s)':>6} {'sent':>6} {'done':>6} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'non-200':>8} {'errors':>7} {'RSS MiB':>8} {'fds':>5} {'tasks':>6} {'gc objs':>8}"
    )
    print(head)
    print("-" * len(head))
    previous = 0.0
    for s in samples:
        w = s.window
        span = s.t - previous
        per_s = f"{w.done / span:.1f}" if span > 0 else "-"
        other = sum(n for code, n in w.statuses.items() if code != 200)
        print(
            f"{s.t:>6.0f} {w.sent:>6} {w.done:>6} {per_s:>7} {ms(w.latencies, 0.5):>7} "
            f"{ms(w.latencies, 0.99):>7} {other:>8} {sum(w.errors.values()):>7} "
            f"{s.rss:>8.1f} {s.fds:>5} {s.tasks:>6} {s.objects:>8}"
        )
        previous = s.t

    mark = MARK if seconds >= 2 * MARK else round(seconds / 2 / SAMPLE_EVERY) * SAMPLE_EVERY
    after = [s for s in samples if s.t >= mark]
    first, last = after[0], after[-1]
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    for s in samples:
        statuses.update(s.window.statuses)
        errors.update(s.window.errors)
    sent = sum(s.window.sent for s in samples)
    done = sum(s.window.done for s in samples)
    all_latencies = [x for s in samples for x in s.window.latencies]

    growth = last.rss - first.rss
    rss_ok = growth <= max(RSS_LIMIT_MIB, RSS_LIMIT_SHARE * first.rss)
    fds = [s.fds for s in after]
    fd_ok = max(fds) - min(fds) <= FD_SPREAD and last.fds <= first.fds + FD_SPREAD
    tasks = [s.tasks for s in after]
    task_ok = max(tasks) - min(tasks) <= TASK_SPREAD and last.tasks <= first.tasks + TASK_SPREAD
    achieved = done / seconds
    load_ok = not errors and achieved >= 0.95 * rate and statuses[200] >= 0.99 * done

    def verdict(ok: bool) -> str:
        return "flat" if ok else "NOT FLAT"

    print()
    print(f"verdict, from the {mark:.0f} s mark to the end ({last.t:.0f} s):")
    limit = max(RSS_LIMIT_MIB, RSS_LIMIT_SHARE * first.rss)
    print(
        f"  RSS     {first.rss:.1f} -> {last.rss:.1f} MiB ({growth:+.2f} MiB, "
        f"{100 * growth / first.rss:+.1f} %, {60 * growth / max(last.t - first.t, 1):+.2f} "
        f"MiB/min)  {verdict(rss_ok)} (limit +{limit:.1f} MiB)"
    )
    print(
        f"  fds     {first.fds} -> {last.fds}, range {min(fds)}..{max(fds)}  "
        f"{verdict(fd_ok)} (limit: spread <= {FD_SPREAD})"
    )
    print(
        f"  tasks   {first.tasks} -> {last.tasks}, range {min(tasks)}..{max(tasks)}  "
        f"{verdict(task_ok)} (limit: spread <= {TASK_SPREAD}; includes requests in flight)"
    )
    print(
        f"  gc objs {first.objects} -> {last.objects} ({last.objects - first.objects:+d}), "
        "for information"
    )
    codes = ", ".join(f"{code}: {n}" for code, n in sorted(statuses.items()))
    print(
        f"  load    {sent} sent, {done} answered ({codes}), {achieved:.1f} req/s achieved of "
        f"{rate:g}; latency p50 {ms(all_latencies, 0.5)} ms, p99 {ms(all_latencies, 0.99)} "
        f"ms, max {max(all_latencies, default=0) * 1000:.1f} ms"
    )
    if errors:
        print(f"  errors  {dict(errors)}")
    ok = rss_ok and fd_ok and task_ok and load_ok
    print(f"overall: {'PASS' if ok else 'FAIL'}")
    return ok


# -- main ---------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="load duration (default 60)")
    parser.add_argument("--quick", action="store_true", help="a 15 s run")
    parser.add_argument("--rate", type=float, default=300.0, help="requests/s (default 300)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the verdict is FAIL")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.port, args.redis_url)
        return 0
    seconds = 15.0 if args.quick else args.seconds
    if seconds < SAMPLE_EVERY * 3 or args.rate <= 0:
        parser.error(f"--seconds must be >= {SAMPLE_EVERY * 3:g} and --rate > 0")

    redis_proc = server = None
    workdir = tempfile.mkdtemp(prefix="tier-soak-")
    log = os.path.join(workdir, "server.log")
    ok = False
    try:
        redis_proc, redis_port = start_redis(workdir)
        port = free_port()
        server = start_server(port, f"redis://{HOST}:{redis_port}/0", log)
        asyncio.run(wait_http(port, server))
        print(
            f"soak: {seconds:g} s at {args.rate:g} requests/s; uvicorn pid {server.pid} on "
            f"{HOST}:{port}, redis-server on {HOST}:{redis_port}; sampling every "
            f"{SAMPLE_EVERY:g} s"
        )
        samples = asyncio.run(drive(port, server.pid, seconds, args.rate))
        ok = report(samples, seconds, args.rate)
        keys = redis_command(redis_port, "DBSIZE").decode().strip().lstrip(":")
        health = redis_command(redis_port, "HLEN", "tier:health").decode().strip().lstrip(":")
        print(f"redis: {keys} keys (sessions and shared state), {health} models in tier:health")
    finally:
        code = stop(server)
        stop(redis_proc)
        if server is not None:
            with open(log, errors="replace") as f:
                lines = [line.rstrip() for line in f if line.strip()]
            other = [line for line in lines if not any(r in line for r in ROUTINE)]
            graceful = any("Application shutdown complete" in line for line in lines)
            how = "SIGTERM, re-raised by uvicorn" if code == -signal.SIGTERM else f"code {code}"
            print(
                f"server: exited ({how}); graceful shutdown logged: {'yes' if graceful else 'NO'}; "
                f"{len(other)} other log line(s) (warnings, errors, tracebacks)"
            )
            for line in other[-10:]:
                print(f"  | {line}")
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if args.strict and not ok else 0


async def wait_http(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no server on port {port} after {START_TIMEOUT} s") from None
            await asyncio.sleep(0.05)  # polling interval
            continue
        writer.write(f"GET {DEBUG_PATH} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        ok = (await reader.readline()).startswith(b"HTTP/1.1 200")
        writer.close()
        await writer.wait_closed()
        if ok:
            return


if __name__ == "__main__":
    sys.exit(main())
