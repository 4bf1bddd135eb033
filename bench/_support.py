"""What the benchmark scripts share: the tiers they route over, and the process plumbing (ports,
child processes, a private redis-server, CPU time from /proc). Scripts, not tests: nothing here
is imported by the package or its tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

HOST = "127.0.0.1"  # loopback only
START_TIMEOUT = 20.0  # seconds for a child server to come up

# The tiers every script routes over: (provider, model, relative cost), three providers as a
# real deployment has them. The tests' configs (tests/configs.py) are smaller on purpose; the
# bench keeps this one so that its figures stay comparable from one change to the next.
MODELS: dict[str, tuple[tuple[str, str, int], ...]] = {
    "simple": (
        ("openai", "gpt-4o-mini", 1),
        ("anthropic", "claude-3-5-haiku", 2),
        ("google", "gemini-1.5-flash", 1),
    ),
    "moderate": (("openai", "gpt-4o", 8), ("anthropic", "claude-3-5-sonnet", 10)),
    "complex": (
        ("openai", "o1", 40),
        ("anthropic", "claude-3-opus", 50),
        ("google", "gemini-1.5-pro", 20),
    ),
}
SIMPLE_MODELS = frozenset(model for _, model, _ in MODELS["simple"])


def tier_config(version: str) -> dict[str, Any]:
    """MODELS as a TierRoutingMiddleware config named `version` (a fresh dict each call)."""
    tiers = {
        tier: [{"provider": p, "model": m, "relative_cost": c} for p, m, c in models]
        for tier, models in MODELS.items()
    }
    return {"version": version, "tiers": tiers}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def child_setup(cpu: int | None = None) -> Callable[[], None]:
    """preexec_fn for a child: pin it to `cpu` (if any), and have Linux SIGTERM it when this
    script dies, so no server outlives the benchmark even if it is killed."""

    def setup() -> None:
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    return setup


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL after `timeout` seconds; the exit code (None without a process)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    return proc.returncode


def wait_listening(
    proc: subprocess.Popen[bytes], port: int, timeout: float = START_TIMEOUT
) -> None:
    """Until `port` accepts connections; RuntimeError if the child exits or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)  # polling interval
    raise RuntimeError(f"server on port {port} not ready after {timeout} s")


def redis_ping(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(workdir: str, cpu: int | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """A private redis-server (no persistence) on a free port; (process, port)."""
    binary = shutil.which(os.environ.get("REDIS_SERVER") or "redis-server")
    if binary is None:
        raise SystemExit("no redis-server on PATH (set REDIS_SERVER, or pass --redis-url)")
    port = free_port()
    args = [
        binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
        "--daemonize", "no", "--dir", workdir, "--logfile", os.path.join(workdir, "redis.log"),
    ]  # fmt: skip
    proc = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=child_setup(cpu),
    )
    deadline = time.monotonic() + START_TIMEOUT
    while not redis_ping(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"redis-server did not start on port {port}")
        time.sleep(0.01)  # polling interval
    return proc, port


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds a process has used so far (Linux /proc), else None."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def run_loop(coro: Any) -> Any:
    """asyncio.run, on uvloop when it is installed (as uvicorn runs the servers)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
