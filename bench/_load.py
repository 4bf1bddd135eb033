"""(b) Over HTTP: each variant served by uvicorn in a subprocess on a free loopback port, driven at
CONNECTIONS keep-alive connections by wrk (when on PATH) or a built-in asyncio load generator;
requests per second, latency, and the server process's CPU time per request (from /proc)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from _apps import (
    CHAT_PATH,
    PROVIDER_VARIANTS,
    ROUTED,
    body_for,
    build_app,
    provider_app,
)
from _support import (
    HOST,
    SIMPLE_MODELS,
    START_TIMEOUT,
    child_setup,
    cpu_seconds,
    free_port,
    stop,
    wait_listening,
)

CONNECTIONS = 32
# The script whose hidden flags run a server (--serve) or the load generator (--loadgen-child).
ENTRY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "middleware.py")


def _uvicorn(app: Any, port: int) -> None:
    import uvicorn

    uvicorn.run(
        app,
        host=HOST,
        port=port,
        loop="uvloop",
        http="httptools",
        workers=1,
        access_log=False,
        log_level="warning",
        lifespan="off",
    )


def serve(variant: str, port: int, provider_url: str | None = None) -> None:
    """Child process: run uvicorn for one variant (invoked via the hidden --serve flag)."""
    _uvicorn(build_app(variant, provider_url), port)


def serve_provider(port: int) -> None:
    """Child process: run uvicorn for the fake provider (the hidden --serve-provider flag)."""
    _uvicorn(provider_app(), port)


def start_server(
    variant: str, port: int, cpu: int | None, provider_url: str | None = None
) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, ENTRY, "--serve", variant, "--port", str(port)]
    if provider_url is not None:
        cmd += ["--provider-url", provider_url]
    return subprocess.Popen(cmd, preexec_fn=child_setup(cpu), stdin=subprocess.DEVNULL)


def start_provider(port: int, cpu: int | None) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, ENTRY, "--serve-provider", "--port", str(port)]
    return subprocess.Popen(cmd, preexec_fn=child_setup(cpu), stdin=subprocess.DEVNULL)


def check_http(variant: str, port: int) -> None:
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        body = body_for(variant)
        conn.request("POST", CHAT_PATH, body=body, headers={"content-type": "application/json"})
        resp = conn.getresponse()
        payload = json.loads(resp.read())
        assert resp.status == 200, (variant, resp.status, payload)
        if variant in ROUTED:
            assert resp.getheader("x-tier") == "simple"
            assert payload["model"] in SIMPLE_MODELS, payload
        else:
            assert resp.getheader("x-tier") is None
    finally:
        conn.close()


WRK_LUA = """\
local f = assert(io.open([[{path}]], "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench-0000000000000000000000000000"
"""


def run_wrk(
    port: int, body: bytes, seconds: float, cpu: int | None, workdir: str
) -> dict[str, Any]:
    body_path = os.path.join(workdir, "body.json")
    with open(body_path, "wb") as f:
        f.write(body)
    lua = os.path.join(workdir, "post.lua")
    with open(lua, "w") as f:
        f.write(WRK_LUA.format(path=body_path))
    cmd = [
        "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s", "--latency",
        "-s", lua, f"http://{HOST}:{port}{CHAT_PATH}",
    ]  # fmt: skip
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=seconds + 30, preexec_fn=child_setup(cpu)
    )
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed: {out.stderr or out.stdout}")
    text = out.stdout
    rps = float(re.search(r"Requests/sec:\s*([\d.]+)", text).group(1))  # type: ignore[union-attr]
    done = int(re.search(r"(\d+) requests in", text).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    errors = re.search(r"Socket errors:.*", text)
    p50 = re.search(r"^\s+50%\s+(\S+)", text, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", text, re.M)
    return {
        "rps": rps,
        "requests": done,
        "non2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(0) if errors else "",
        "p50": p50.group(1) if p50 else "?",
        "p99": p99.group(1) if p99 else "?",
    }


async def loadgen(port: int, body: bytes, warmup: float, seconds: float) -> dict[str, Any]:
    """HTTP/1.1 keep-alive POSTs on CONNECTIONS raw asyncio streams, one in flight per stream."""
    request = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        "Content-Type: application/json\r\n"
        "Authorization: Bearer sk-bench-0000000000000000000000000000\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    counts = [0] * CONNECTIONS
    done = [0] * CONNECTIONS  # warm-up included
    bad = [0] * CONNECTIONS
    latencies: list[float] = []
    state = {"measuring": False}

    async def worker(i: int) -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            while True:
                t0 = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                lower = head.lower()
                j = lower.index(b"content-length:") + 15
                length = int(lower[j : lower.index(b"\r\n", j)])
                await reader.readexactly(length)
                done[i] += 1
                if state["measuring"]:
                    counts[i] += 1
                    if not head.startswith(b"HTTP/1.1 200"):
                        bad[i] += 1
                    latencies.append(time.perf_counter() - t0)
        finally:
            writer.close()

    tasks = [asyncio.create_task(worker(i)) for i in range(CONNECTIONS)]
    try:
        await asyncio.sleep(warmup)
        state["measuring"] = True
        t0 = time.perf_counter()
        await asyncio.sleep(seconds)
        total = sum(counts)
        elapsed = time.perf_counter() - t0
        state["measuring"] = False
        for t in tasks:
            if t.done() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    latencies.sort()

    def pct(p: float) -> str:
        if not latencies:
            return "?"
        return f"{latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000:.2f}ms"

    return {
        "rps": total / elapsed,
        "requests": sum(done),  # all the server answered while the generator ran
        "non2xx": sum(bad),
        "socket_errors": "",
        "p50": pct(0.50),
        "p99": pct(0.99),
    }


def run_pyload(
    port: int, body: bytes, warmup: float, seconds: float, cpu: int | None, workdir: str
) -> dict[str, Any]:
    body_path = os.path.join(workdir, "body.json")
    with open(body_path, "wb") as f:
        f.write(body)
    cmd = [
        sys.executable, ENTRY, "--loadgen-child", "--port", str(port),
        "--body-file", body_path, "--warmup", str(warmup), "--seconds", str(seconds),
    ]  # fmt: skip
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=warmup + seconds + 30,
        preexec_fn=child_setup(cpu),
    )
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# What each variant's requests per second are divided by, round by round.
BASELINES = {
    "middleware": "bare",
    "passthrough": "bare",
    "reference": "bare",
    "provider-routed": "provider-bare",
}


def over_http(
    variants: tuple[str, ...], seconds: float, warmup: float, rounds: int, loadgen: str
) -> dict[str, Any]:
    """Each round runs every variant once on a fresh server, the order reversed every other
    round; medians over rounds, and each variant's median ratio to its baseline (BASELINES)."""
    use_wrk = loadgen == "wrk" or (loadgen == "auto" and shutil.which("wrk") is not None)
    if loadgen == "wrk" and shutil.which("wrk") is None:
        raise SystemExit("--loadgen wrk: wrk is not on PATH")
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    server_cpu, gen_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
    gen_name = "wrk 1 thread" if use_wrk else "built-in asyncio generator (uvloop)"
    print(f"  load generator: {gen_name}, {CONNECTIONS} keep-alive connections")
    if server_cpu is None:
        print("  CPU pinning: unavailable (fewer than 2 CPUs); server and generator share CPUs")
    else:
        print(f"  CPU pinning: server on CPU {server_cpu}, load generator on CPU {gen_cpu}")
    print(
        f"  per run: {warmup:g} s warm-up then {seconds:g} s measured; {rounds} round(s), "
        "fresh server per run"
    )
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    provider: subprocess.Popen[bytes] | None = None
    provider_url = None
    try:
        if any(v in PROVIDER_VARIANTS for v in variants):
            provider_port = free_port()
            provider = start_provider(provider_port, gen_cpu)
            # It imports the tests' SDKs and frameworks: slow to start on a busy machine.
            wait_listening(provider, provider_port, timeout=3 * START_TIMEOUT)
            provider_url = f"http://{HOST}:{provider_port}"
            where = "" if gen_cpu is None else f" on CPU {gen_cpu} (beside the load generator)"
            print(
                f"  provider variants: the fake provider (tests/llm_provider.py) under uvicorn "
                f"at {provider_url}{where}, one process for the whole run"
            )
        with tempfile.TemporaryDirectory(prefix="tier-bench-") as workdir:
            for r in range(rounds):
                for variant in variants if r % 2 == 0 else variants[::-1]:
                    url = provider_url if variant in PROVIDER_VARIANTS else None
                    provider_pid = provider.pid if url is not None and provider else None
                    res = _run(variant, url, provider_pid, seconds, warmup, use_wrk, workdir,
                               server_cpu, gen_cpu)  # fmt: skip
                    results[variant].append(res)
                    _print_run(r, variant, res)
    finally:
        stop(provider)
    summary: dict[str, Any] = {v: statistics.median(x["rps"] for x in results[v]) for v in variants}
    for v in variants:
        for key in ("cpu_us", "provider_cpu_us", "busy"):
            values = [x[key] for x in results[v] if x.get(key) is not None]
            summary[f"{v}_{key}"] = statistics.median(values) if values else None
    # Each round runs every variant once, back to back: a ratio within a round shares that
    # round's machine load, so the median of per-round ratios holds up better than a ratio of
    # medians when other tenants come and go.
    for v, base in BASELINES.items():
        if v in results and base in results:
            summary[f"{v}_ratio"] = statistics.median(
                x["rps"] / b["rps"] for x, b in zip(results[v], results[base], strict=True)
            )
    # How far the bare endpoint's own runs spread (range over median): what "within noise" is.
    bare = [x["rps"] for x in results.get("bare", [])]
    summary["bare_spread"] = (max(bare) - min(bare)) / statistics.median(bare) if bare else None
    summary["errors"] = sum(x["non2xx"] for v in variants for x in results[v])
    summary["generator"] = gen_name
    return summary


def _run(
    variant: str,
    provider_url: str | None,
    provider_pid: int | None,
    seconds: float,
    warmup: float,
    use_wrk: bool,
    workdir: str,
    server_cpu: int | None,
    gen_cpu: int | None,
) -> dict[str, Any]:
    """One run of one variant on a fresh server; the generator's figures, and the CPU time the
    server (and the provider) used per request."""
    port = free_port()
    body = body_for(variant)
    proc = start_server(variant, port, server_cpu, provider_url)
    try:
        wait_listening(proc, port)
        check_http(variant, port)
        if use_wrk:
            run_wrk(port, body, warmup, gen_cpu, workdir)  # warm-up, discarded
        cpu0, provider0 = cpu_seconds(proc.pid), cpu_seconds(provider_pid)
        if use_wrk:
            res = run_wrk(port, body, seconds, gen_cpu, workdir)
        else:
            res = run_pyload(port, body, warmup, seconds, gen_cpu, workdir)
        cpu1, provider1 = cpu_seconds(proc.pid), cpu_seconds(provider_pid)
    finally:
        stop(proc)

    def per_request(t0: float | None, t1: float | None) -> float | None:
        if t0 is None or t1 is None or not res["requests"]:
            return None
        return (t1 - t0) / res["requests"] * 1e6

    res["cpu_us"] = per_request(cpu0, cpu1)
    res["provider_cpu_us"] = per_request(provider0, provider1)
    # The share of its CPU the server was busy: near 1 when it, not the generator or the
    # provider, set the pace.
    res["busy"] = res["rps"] * res["cpu_us"] / 1e6 if res["cpu_us"] is not None else None
    return res


def _print_run(r: int, variant: str, res: dict[str, Any]) -> None:
    note = f" non-2xx={res['non2xx']}" if res["non2xx"] else ""
    note += f" {res['socket_errors']}" if res["socket_errors"] else ""
    cpu = f"{res['cpu_us']:6.1f}" if res["cpu_us"] is not None else "   n/a"
    busy = f" ({res['busy']:4.0%} busy)" if res["busy"] is not None else ""
    if res["provider_cpu_us"] is not None:
        note = f", provider {res['provider_cpu_us']:5.1f}" + note
    print(
        f"  round {r + 1} {variant:<15} {res['rps']:>7.0f} req/s  "
        f"p50 {res['p50']:>8}  p99 {res['p99']:>8}  CPU us/req: server {cpu}{busy}{note}"
    )
