#!/usr/bin/env python
"""Benchmark: a Starlette chat endpoint with and without TierRoutingMiddleware.

Four variants of the same app (the endpoint does ``await request.body()``, ``json.loads`` and
returns a small JSONResponse):

* ``bare``        -- no middleware; the ~4 KB chat body names a plain ``"model"``.
* ``middleware``  -- TierRoutingMiddleware(routes=["/v1/chat/completions"]); the same body with
                     ``"tier": "simple"`` instead of ``"model"`` (read, routed, rewritten).
* ``passthrough`` -- the middleware is installed but the request is not opted in (its
                     ``routes`` do not include the request path), with the bare body.
* ``reference``   -- a yardstick, not the product: a few lines of ASGI doing only the work any
                     tier router must do (validate and rewrite the body, add four headers).
                     What it costs is what the targets leave for everything else.

(a) In process: the ASGI app is called directly (hand-built scope/receive/send, no network);
    median microseconds per request over several repeats, variants interleaved.
(b) Over HTTP: uvicorn (uvloop + httptools, one worker, access log off) in a subprocess on a
    free 127.0.0.1 port per variant, driven at 32 keep-alive connections by ``wrk`` when on PATH,
    else by a built-in asyncio load generator. Server and generator are pinned to different
    CPUs when the machine has two or more. Besides requests/s, the server process's CPU time
    per request (from /proc) is reported: it holds up better than requests/s when other
    processes compete for the CPUs.

Run from the repository root with the project's venv active:

    python bench/middleware.py              # full run (about 3 minutes)
    python bench/middleware.py --quick      # fewer iterations, 3 s HTTP runs
    python bench/middleware.py --skip-http  # in-process part only
    python bench/middleware.py --profile    # also: cProfile, bytecodes per request by
                                            # function, ablations, a cold-cache run

This is a script, not a test: it exits 0 whether targets are met or not (``--strict`` makes a
MISS exit 1).
"""

from __future__ import annotations

import os
import sys

# `python bench/middleware.py` puts bench/ first on sys.path, where a sibling script's name could
# shadow a stdlib module: move it last, so that only the bench/_*.py modules are found there.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.append(sys.path.pop(0))

import argparse
import json
import platform
import subprocess

from _apps import BODY_MODEL, BODY_TIER, VARIANTS
from _inprocess import in_process
from _load import loadgen, over_http, serve
from _profile import profile
from _support import HOST, run_loop

TARGET_ADDED_US = 15.0
TARGET_RATIO = 0.90


# -- main -----------------------------------------------------------------------------------------


def _source_version() -> str:
    """Which middleware was measured: git commit, and a hash of the package's sources (the tree
    may hold uncommitted edits)."""
    import hashlib

    import tier_middleware

    root = os.path.dirname(os.path.abspath(tier_middleware.__file__))
    digest = hashlib.sha1()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name), "rb") as f:
                    digest.update(name.encode() + b"\0" + f.read())
    try:
        commit = subprocess.run(
            ["git", "-C", root, "log", "-1", "--format=%h"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "."],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "?", ""
    edits = " + uncommitted edits" if dirty else ""
    return f"git {commit}{edits}, sources sha1 {digest.hexdigest()[:10]}"


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="fewer iterations, 3 s HTTP runs")
    p.add_argument("--skip-http", action="store_true", help="in-process part only")
    p.add_argument("--profile", action="store_true", help="also profile the middleware path")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto",
                   help="HTTP load generator (default: wrk if on PATH)")  # fmt: skip
    p.add_argument("--iterations", type=int, help="in-process requests per sample")
    p.add_argument("--repeats", type=int, help="in-process samples per variant")
    p.add_argument("--seconds", type=float, help="measured seconds per HTTP run")
    p.add_argument("--rounds", type=int, help="HTTP runs per variant")
    # internal: child processes
    p.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--loadgen-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--body-file", help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=float, default=2.0, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.serve:
        serve(args.serve, args.port)
        return 0
    if args.loadgen_child:
        with open(args.body_file, "rb") as f:
            body = f.read()
        print(json.dumps(run_loop(loadgen(args.port, body, args.warmup, args.seconds))))
        return 0

    iterations = args.iterations or (3000 if args.quick else 20000)
    repeats = args.repeats or (3 if args.quick else 7)
    seconds = args.seconds or (3.0 if args.quick else 5.0)
    warmup = 1.0 if args.quick else 2.0
    rounds = args.rounds or (1 if args.quick else 4)

    import starlette
    import uvicorn

    print(
        f"tier_middleware bench: Python {platform.python_version()}, starlette "
        f"{starlette.__version__}, uvicorn {uvicorn.__version__}, {os.cpu_count()} CPUs, "
        f"mode={'quick' if args.quick else 'full'}, load average {_load()}"
    )
    print(f"tier_middleware measured: {_source_version()}")
    print(
        f'body: {len(BODY_TIER)} B with "tier": "simple" (middleware), {len(BODY_MODEL)} B '
        'with "model" (bare, passthrough)'
    )
    print(f"\n(a) in process: {iterations} requests x {repeats} repeats per variant")
    res = in_process(iterations, repeats, warmup=max(1000, iterations // 10))
    added = res["middleware"] - res["bare"]
    passthrough = res["passthrough"] - res["bare"]

    http_res = None
    if not args.skip_http:
        print(f"\n(b) over HTTP: uvicorn loop=uvloop http=httptools, 1 worker, {HOST}")
        http_res = over_http(seconds, warmup, rounds, args.loadgen)

    rows: list[tuple[str, str, str, str]] = [
        ("in-process bare", f"{res['bare']:.2f} us/req", "", ""),
        ("in-process middleware (routed)", f"{res['middleware']:.2f} us/req", "", ""),
        ("in-process middleware (pass-through)", f"{res['passthrough']:.2f} us/req", "", ""),
        ("added us per request (routed)", f"{added:+.2f} us", f"<= {TARGET_ADDED_US:g} us",
         verdict(added <= TARGET_ADDED_US)),
        ("added us per request (pass-through)", f"{passthrough:+.2f} us", "(info)", ""),
        ("added us per request (reference)", f"{res['reference'] - res['bare']:+.2f} us",
         "(info)", ""),
        ("added, from the fastest samples", f"{res['middleware_min'] - res['bare_min']:+.2f} us",
         "(info)", ""),
    ]  # fmt: skip
    ok = added <= TARGET_ADDED_US
    if http_res is not None:
        ratio = http_res["middleware_ratio"]
        ok = ok and ratio >= TARGET_RATIO and not http_res["errors"]
        rows += [
            ("HTTP bare", f"{http_res['bare']:.0f} req/s", "", ""),
            ("HTTP middleware (routed)", f"{http_res['middleware']:.0f} req/s", "", ""),
            ("HTTP middleware (pass-through)", f"{http_res['passthrough']:.0f} req/s", "", ""),
            ("HTTP ratio middleware / bare", f"{ratio:.3f}", f">= {TARGET_RATIO:.2f}",
             verdict(ratio >= TARGET_RATIO)),
            ("HTTP ratio pass-through / bare",
             f"{http_res['passthrough_ratio']:.3f}", "(info)", ""),
            ("HTTP ratio reference / bare",
             f"{http_res['reference_ratio']:.3f}", "(info)", ""),
        ]  # fmt: skip
        if http_res["bare_cpu"] is not None and http_res["middleware_cpu"] is not None:
            rows += [
                ("HTTP server CPU per request, bare", f"{http_res['bare_cpu']:.1f} us", "", ""),
                ("HTTP server CPU per request, middleware",
                 f"{http_res['middleware_cpu']:.1f} us", "", ""),
                ("HTTP server CPU added by the middleware",
                 f"{http_res['middleware_cpu'] - http_res['bare_cpu']:+.1f} us", "(info)", ""),
            ]  # fmt: skip
            if http_res["reference_cpu"] is not None:
                rows.append(("HTTP server CPU added by the reference",
                             f"{http_res['reference_cpu'] - http_res['bare_cpu']:+.1f} us",
                             "(info)", ""))  # fmt: skip
        if http_res["errors"]:
            rows.append(("HTTP non-2xx responses", str(http_res["errors"]), "0", "MISS"))

    print("\nSummary" + (" (medians)" if not args.quick else " (quick mode: indicative only)"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    widths = [
        max(w, len(h)) for w, h in zip(widths, ("metric", "value", "target", "result"), strict=True)
    ]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format("metric", "value", "target", "result"))
    print(line.format(*("-" * w for w in widths)))
    for r in rows:
        print(line.format(*r).rstrip())

    print(f"(load average at the end: {_load()}; other processes on the machine skew the figures)")
    if args.profile:
        profile(iterations)
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
