"""A real redis-server for the tests, under the tests' control; a black-hole TCP listener; and a
relay that can partition the network in front of a server.

`redis_server` (session-scoped process, flushed before each test) and `fresh_redis_server` (one
process per test, for tests that kill or pause it) start `redis-server` on a free loopback port
(and a unix socket) and wait for PING with a deadline. With REDIS_URL set, that server is used
instead: its database is flushed before each test, and tests that need to own the process skip.
REDIS_SERVER may name the binary. Without one and without REDIS_URL the Redis tests skip, unless CI is set:
then they fail, so a CI job cannot silently lose them.

The fixtures are imported into conftest.py.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from servers import free_port, missing

START_TIMEOUT = 10.0  # seconds for a server to answer PING after it is spawned


class RedisServer:
    """One redis-server process on a fixed loopback port; it can be stopped and started again on
    the same port."""

    owned = True

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.socket_path = workdir / "redis.sock"
        self.logfile = workdir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}?db=0"

    def start(self) -> None:
        assert self._proc is None, "already running"
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "unixsocket": str(self.socket_path),
            "unixsocketperm": "700",
            "save": "",
            "appendonly": "no",
            "daemonize": "no",
            "dir": str(self.workdir),
            "logfile": str(self.logfile),
        }
        args = [self.binary]
        for name, value in options.items():
            args += [f"--{name}", value]
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers_ping():
            if self._proc.poll() is not None:
                log = self.logfile.read_text(errors="replace") if self.logfile.exists() else ""
                self._proc = None
                raise RuntimeError(f"redis-server exited on start:\n{log[-2000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not answer PING within {START_TIMEOUT}s")
            time.sleep(0.005)  # polling interval, not a wait for something to happen

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM)."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """Abrupt death (SIGKILL): the kernel closes every client connection."""
        self._end(signal.SIGKILL)

    def _end(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a frozen process acts on SIGTERM only then
        proc.wait(timeout=10)

    def close(self) -> None:
        self.kill()

    def client(self) -> redis.Redis:
        """A plain synchronous client (use it in a `with` block so it is closed)."""
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def command(self, *args: Any) -> Any:
        with self.client() as client:
            return client.execute_command(*args)

    def flush(self) -> None:
        self.command("FLUSHALL")

    def pause(self, ms: int) -> None:
        """Stop the server answering any client for `ms` milliseconds (CLIENT PAUSE ... ALL)."""
        self.command("CLIENT", "PAUSE", ms, "ALL")

    # CLIENT UNPAUSE cannot end an ALL pause early: Redis 7.0 holds that command too.

    def freeze(self) -> None:
        """Stop the process (SIGSTOP): the kernel still accepts connections, nothing answers."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)


class ExternalRedis(RedisServer):
    """The server REDIS_URL names: used as is; whatever would need to own the process skips."""

    owned = False

    def __init__(self, url: str) -> None:  # no process, port or workdir of our own
        self._url = url

    @property
    def url(self) -> str:
        return self._url

    @property
    def unix_url(self) -> str:
        pytest.skip("REDIS_URL is set: no unix socket of our own to test")

    def start(self) -> None:
        pytest.skip("REDIS_URL is set: the tests do not own that server's process")

    def _end(self, sig: signal.Signals) -> None:
        pytest.skip("REDIS_URL is set: the tests do not own that server's process")

    def close(self) -> None:
        pass

    def pause(self, ms: int) -> None:
        pytest.skip("REDIS_URL is set: pausing a shared server would disturb others")

    def freeze(self) -> None:
        pytest.skip("REDIS_URL is set: the tests do not own that server's process")

    def flush(self) -> None:
        self.command("FLUSHDB")  # only the database the URL names


def _server(workdir: Path) -> RedisServer:
    url = os.environ.get("REDIS_URL")
    if url:
        return ExternalRedis(url)
    wanted = os.environ.get("REDIS_SERVER") or "redis-server"  # a name on PATH, or a path
    binary = shutil.which(wanted)
    if binary is None:
        missing(f"no {wanted!r} executable found (set REDIS_SERVER or REDIS_URL)")
    return RedisServer(binary, workdir)


@pytest.fixture(scope="session")
def _redis_session_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = _server(tmp_path_factory.mktemp("redis"))
    if server.owned:
        server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_server(_redis_session_server: RedisServer) -> RedisServer:
    """The shared server, emptied for this test. Do not kill or pause it: use
    `fresh_redis_server` for that."""
    _redis_session_server.flush()
    return _redis_session_server


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def redis_url(request: pytest.FixtureRequest) -> str | None:
    """Each test twice: sessions in memory (None), then on the shared server (its URL)."""
    if request.param == "memory":
        return None
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture
def fresh_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test's own, to kill, restart or pause."""
    server = _server(tmp_path)
    if not server.owned:
        pytest.skip("REDIS_URL is set: this test needs a redis-server process of its own")
    server.start()
    try:
        yield server
    finally:
        server.close()


class BlackHole:
    """A TCP listener that accepts every connection and never sends a byte."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="black-hole", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"redis://{self.address[0]}:{self.address[1]}/0"

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            while not self._stop.is_set():
                if selector.select(timeout=0.02):
                    self._accept()

    def _accept(self) -> None:
        with self._lock:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, OSError):
                return
            self._held.append(conn)

    def accepted(self) -> int:
        """Connections accepted so far, once none is left waiting in the backlog."""
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            with self._lock, selectors.DefaultSelector() as selector:
                selector.register(self._listener, selectors.EVENT_READ)
                if not selector.select(timeout=0):
                    return len(self._held)
            time.sleep(0.001)  # polling interval: let the accept thread take the backlog
        raise AssertionError("the black hole's backlog never drained")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            for conn in self._held:
                conn.close()
            self._held.clear()
        self._listener.close()


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    """A loopback address that accepts connections and never replies (`.address`, `.url`)."""
    hole = BlackHole()
    try:
        yield hole
    finally:
        hole.close()


class Partition:
    """A TCP relay in front of Redis that can black-hole the traffic.

    While `cut`, bytes are swallowed in both directions and new connections are accepted and
    never answered: no RST, no FIN, only silence (a network partition, a dead NAT entry).
    `heal()` forwards again and drops the connections that were accepted during the cut.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.cut = False
        self.listen_port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._held: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.listen_port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.listen_port = self._server.sockets[0].getsockname()[1]

    def heal(self) -> None:
        self.cut = False
        for writer in self._held:
            writer.close()
        self._held.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        if self.cut:
            self._held.append(writer)
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writers.append(up_writer)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pipe(source, sink))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if not self.cut:
                    writer.write(data)
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in self._writers:
            writer.close()
        for task in list(self._pipes):
            task.cancel()
        if self._pipes:
            await asyncio.wait(list(self._pipes))
