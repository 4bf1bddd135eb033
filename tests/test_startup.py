"""A config that cannot be loaded stops the service where its operator looks: at startup.

A relative config path is resolved against the server's working directory, so a server started
elsewhere misses the file. Built at import (Django's asgi.py), the middleware raises there; built
lazily inside the server's first call (Starlette and FastAPI build their middleware stack in the
lifespan scope), it fails lifespan startup, and uvicorn exits instead of serving errors. Either
way the message names the absolute path and the working directory. A control plane that is down
is not a reason to refuse to start: it may come up later.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from servers import STARTUP_DEADLINE, Server, free_port, stop, wait_until_listening
from test_frameworks import make_django
from tier_middleware import ConfigError, ControlPlaneSource, TierRoutingMiddleware

TESTS_DIR = Path(__file__).resolve().parent
CHAT = "/v1/chat/completions"
NOT_TOML = "[[tiers.simple]\nprovider = = 'x'\n"
PROBLEMS = {"missing": "cannot read config file", "unparsable": "not valid TOML"}
APPS = {  # uvicorn's arguments for each app
    "starlette": "--factory config_apps:starlette",
    "fastapi": "--factory config_apps:fastapi",
    "django": "config_django:application",  # built when uvicorn imports the module
    "django-in-loop": "--factory config_apps:django",  # as under --reload or --workers
}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory that is not the one the config was written for."""
    path = (tmp_path / "elsewhere").resolve()
    path.mkdir()
    monkeypatch.chdir(path)
    return path


def break_config(workdir: Path, problem: str) -> str:
    """The relative config path to use, made missing or unparsable; returns the path."""
    if problem == "unparsable":
        (workdir / "tiers.toml").write_text(NOT_TOML)
    return "tiers.toml"


def assert_names_the_place(message: str, workdir: Path, problem: str) -> None:
    assert f"tiers.toml: {PROBLEMS[problem]}" in message
    assert f"absolute path {workdir / 'tiers.toml'}, working directory {workdir}" in message


# -- a real uvicorn, started from another directory ------------------------------------------------


@pytest.fixture
def uvicorn(workdir: Path, tmp_path: Path) -> Iterator[Any]:
    """Starts `uvicorn --factory config_apps:<framework>` in `workdir`; stops what it started."""
    servers: list[Server] = []

    def start(framework: str, **env: str) -> tuple[Server, int]:
        port = free_port()
        target = APPS[framework]
        argv = [
            sys.executable, "-W", "error", "-m", "uvicorn", *target.split(),
            "--app-dir", str(TESTS_DIR), "--host", "127.0.0.1", "--port", str(port),
        ]  # fmt: skip
        log = tmp_path / f"{framework}-{len(servers)}.log"
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv, cwd=workdir, env=environment, stdout=out, stderr=subprocess.STDOUT
            )
        server = Server(f"http://127.0.0.1:{port}", log, process)
        servers.append(server)
        return server, port

    yield start
    for server in servers:
        stop(server)


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("framework", APPS)
def test_uvicorn_refuses_to_start_and_says_where_it_looked(
    uvicorn: Any, workdir: Path, framework: str, problem: str
) -> None:
    server, _ = uvicorn(framework, TIER_CONFIG=break_config(workdir, problem))
    try:
        returncode = server.process.wait(timeout=STARTUP_DEADLINE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server kept running:\n{server.log_text()}")
    log = server.log_text()
    assert_names_the_place(log, workdir, problem)
    assert "Uvicorn running on" not in log, log
    if framework == "django":
        # Built at import: the ConfigError stops uvicorn while it loads the app.
        assert returncode == 1, log
        assert "ConfigError" in log, log
    else:
        # Built in the server's event loop: lifespan.startup.failed, which uvicorn exits on.
        assert returncode == 3, log
        assert "Application startup failed. Exiting." in log, log
        assert "appears unsupported" not in log, log


@pytest.mark.parametrize("framework", ["starlette", "django"])
def test_a_control_plane_that_is_down_does_not_stop_the_server(
    uvicorn: Any, framework: str
) -> None:
    url = f"http://127.0.0.1:{free_port()}/api/v1/tiers/config"  # nothing listens there
    server, port = uvicorn(framework, CONTROL_PLANE_URL=url)
    wait_until_listening(server, port)
    with httpx.Client(base_url=server.url, timeout=5.0, trust_env=False) as http:
        response = http.post(CHAT, json={"tier": "simple", "messages": []})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "config_unavailable"
    assert stop(server)
    assert server.process.returncode in (0, -signal.SIGTERM), server.log_text()


# -- in process ------------------------------------------------------------------------------------


@pytest.mark.parametrize("problem", PROBLEMS)
def test_built_at_import_it_raises_naming_the_place(workdir: Path, problem: str) -> None:
    # What Django's asgi.py does: no event loop is running yet.
    with pytest.raises(ConfigError) as info:
        TierRoutingMiddleware(make_django(), config=break_config(workdir, problem), routes=[CHAT])
    assert_names_the_place(str(info.value), workdir, problem)


STARTED: list[str] = []  # the app's own lifespan startups


@asynccontextmanager
async def app_lifespan(app: Any) -> AsyncIterator[None]:
    STARTED.append("app")
    yield


async def healthz(request: Any) -> PlainTextResponse:
    return PlainTextResponse("ok")


def lazy_app(framework: str, config: str) -> Starlette:
    """The framework's app with the middleware added: built at its first call, not here."""
    app: Starlette
    if framework == "fastapi":
        app = FastAPI(lifespan=app_lifespan)
        app.add_api_route("/healthz", healthz)
    else:
        app = Starlette(routes=[Route("/healthz", healthz)], lifespan=app_lifespan)
    app.add_middleware(TierRoutingMiddleware, config=config, routes=[CHAT])
    return app


async def lifespan_startup(app: Any) -> list[dict[str, Any]]:
    """A server's lifespan exchange, up to the answer to `lifespan.startup`."""
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    return sent


def records_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "tier_middleware" and r.levelno >= logging.ERROR]


@pytest.mark.anyio
@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
async def test_built_lazily_it_fails_lifespan_startup_with_the_reason(
    workdir: Path, framework: str, problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    STARTED.clear()
    app = lazy_app(framework, break_config(workdir, problem))
    [answer] = await lifespan_startup(app)
    assert answer["type"] == "lifespan.startup.failed"
    assert_names_the_place(answer["message"], workdir, problem)
    assert STARTED == []  # the app's own startup never ran

    # A server that starts anyway gets a 503 for every request, the reason staying in the log.
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        for response in [
            await http.post(CHAT, json={"tier": "simple"}),
            await http.get("/healthz"),
        ]:
            assert response.status_code == 503
            error = response.json()["error"]
            assert (error["code"], error["type"]) == ("config_unavailable", "service_unavailable")
            assert "tiers.toml" not in error["message"]  # no server paths to clients
            assert "retry-after" in response.headers
    assert records_of(caplog) == []  # said once already, at lifespan startup


@pytest.mark.anyio
async def test_without_lifespan_the_first_request_logs_the_reason_once(
    workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = lazy_app("starlette", break_config(workdir, "missing"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        statuses = [(await http.post(CHAT, json={"tier": "simple"})).status_code for _ in range(3)]
    assert statuses == [503, 503, 503]
    [record] = records_of(caplog)
    assert_names_the_place(record.getMessage(), workdir, "missing")


@pytest.mark.anyio
async def test_a_fallback_file_that_cannot_be_loaded_fails_startup_too(workdir: Path) -> None:
    app = Starlette()
    plane = ControlPlaneSource(f"http://127.0.0.1:{free_port()}/api/v1/tiers/config")
    app.add_middleware(TierRoutingMiddleware, config=plane, fallback="tiers.toml", routes=[CHAT])
    [answer] = await lifespan_startup(app)
    assert answer["type"] == "lifespan.startup.failed"
    assert_names_the_place(answer["message"], workdir, "missing")


# -- building a middleware registers nothing -----------------------------------------------------


@pytest.mark.anyio
async def test_building_registers_nothing_and_the_first_call_does(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    from asgi_harness import Provider, call
    from configs import two_per_tier
    from tier_middleware._status import registered_status_sources

    registry = CollectorRegistry()
    mw = TierRoutingMiddleware(Provider(), config=two_per_tier(), registry=registry)
    assert generate_latest(registry) == b""
    assert all(source is not mw for source in registered_status_sources())
    result = await call(mw, b'{"tier": "simple"}')
    assert result.status == 200
    assert b"llm_tier_requests_total" in generate_latest(registry)
    assert any(source is mw for source in registered_status_sources())

    # A registry that already holds one of our names: logged, and the requests are served.
    clashing = CollectorRegistry()
    Counter("llm_tokens", "someone else's", registry=clashing)
    other = TierRoutingMiddleware(Provider(), config=two_per_tier(), registry=clashing)
    with caplog.at_level(logging.ERROR, logger="tier_middleware"):
        assert (await call(other, b'{"tier": "simple"}')).status == 200
    assert "tier metrics not registered" in caplog.text
    assert b"llm_tier_requests_total" not in generate_latest(clashing)  # nothing half-registered
