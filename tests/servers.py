"""Real servers in subprocesses, on loopback ports: start, wait until they listen, stop.

Shared by the example tests, the startup tests and the Redis fixtures.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import httpx
import pytest

STARTUP_DEADLINE = 15.0  # seconds; a cold start (first import of Django, FastAPI) is ~1 s


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
