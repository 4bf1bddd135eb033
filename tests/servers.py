"""Real servers on loopback ports: in subprocesses (start, wait until they listen, stop), uvicorn
in the test's own event loop (`serve`), and a real Prometheus that scrapes one of them.

Shared by the example, startup, streaming, upstream and body tests and the Redis fixtures.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import anyio
import httpx
import pytest
import uvicorn

STARTUP_DEADLINE = 15.0  # seconds; a cold start (first import of Django, FastAPI) is ~1 s
SCRAPE_DEADLINE = 30.0  # seconds to a first scrape; ~6 s here (targets reach scrapers every 5 s)

T = TypeVar("T")


def ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(reason: str) -> NoReturn:
    """Skip a test whose server binary is missing; under CI, fail it instead."""
    if ci():
        pytest.fail(f"{reason}; CI is set, so this test may not be skipped")
    pytest.skip(reason)


@dataclass
class Server:
    url: str
    log: Path
    process: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_listening(server: Server, port: int, deadline: float = STARTUP_DEADLINE) -> None:
    until = time.monotonic() + deadline
    while True:
        if server.process.poll() is not None:
            pytest.fail(f"the server exited with {server.process.returncode}:\n{server.log_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > until:
                pytest.fail(f"the server did not listen within {deadline} s:\n{server.log_text()}")
            time.sleep(0.02)  # poll interval, not a timing assumption


def stop(server: Server) -> bool:
    """SIGTERM (uvicorn's graceful shutdown); False if the server had to be killed."""
    process = server.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return False
    return True


def client(server: Server) -> httpx.Client:
    # trust_env=False: an HTTP(S)_PROXY in the environment must not capture loopback calls.
    return httpx.Client(base_url=server.url, timeout=5.0, trust_env=False)


@contextmanager
def prometheus(workdir: Path, target: str, metrics_path: str) -> Iterator[httpx.Client]:
    """A real Prometheus scraping `target` (host:port) at `metrics_path` every second, without
    following redirects (a redirect is a failed scrape, as for scrapers that do not follow
    them); yields a client for its HTTP API, once it is ready."""
    binary = shutil.which(os.environ.get("PROMETHEUS") or "prometheus")
    if binary is None:
        missing("no 'prometheus' executable found (apt-get install prometheus, or set PROMETHEUS)")
    config = {  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [
            {
                "job_name": "tier",
                "metrics_path": metrics_path,
                "follow_redirects": False,
                "static_configs": [{"targets": [target]}],
            }
        ],
    }
    (workdir / "prometheus.yml").write_text(json.dumps(config))
    port = free_port()
    argv = [
        binary, f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
    ]  # fmt: skip
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", log, process)
    try:
        with client(server) as api:
            until(lambda: _ready(api), f"Prometheus was not ready:\n{server.log_text()}")
            yield api
    finally:
        assert stop(server), server.log_text()


def _ready(api: httpx.Client) -> bool:
    try:
        return api.get("/-/ready").status_code == 200
    except httpx.TransportError:
        return False


def until(check: Callable[[], T], failure: str, deadline: float = SCRAPE_DEADLINE) -> T:
    """Poll `check()` until it returns something truthy, which is returned; fail after the
    deadline."""
    end = time.monotonic() + deadline
    while not (result := check()):
        if time.monotonic() > end:
            pytest.fail(f"{failure} (waited {deadline} s)")
        time.sleep(0.05)  # poll interval, not a timing assumption
    return result


@asynccontextmanager
async def serve(app: Any, **config: Any) -> AsyncIterator[str]:
    """Run `app` under uvicorn in this event loop, on a free loopback port (`config`: more
    `uvicorn.Config` options, such as `http="h11"`)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            interface="asgi3",
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,  # a test that failed mid-request must not hang here
            **config,
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        with anyio.fail_after(5):
            while not server.started:  # noqa: ASYNC110  (uvicorn offers a flag, no event)
                await asyncio.sleep(0.005)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()
