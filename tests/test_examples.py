"""The examples, each served by a real uvicorn in a subprocess and called over HTTP.

The servers run with `-W error`, like the test suite, so a deprecation warning raised while
importing or serving an example fails here too. A server's log is checked for tracebacks when it
is stopped.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from samples import parse, value
from servers import Server, client, free_port, prometheus, stop, until, wait_until_listening
from tier_middleware import TierConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {
    "starlette": "examples.starlette_app:app",
    "fastapi": "examples.fastapi_app:app",
    "django": "examples.django_project.asgi:application",
}
SCRIPTS = {"starlette": "examples/starlette_app.py", "fastapi": "examples/fastapi_app.py"}

TIERS = TierConfig.load(ROOT / "examples" / "tiers.toml")
PROVIDER_OF = {(t, m.model): m.provider for t in TIERS.tier_order for m in TIERS.models(t)}
MODELS = {t: {m.model for m in TIERS.models(t)} for t in TIERS.tier_order}
MESSAGES = [{"role": "user", "content": "hi there"}]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Starts an example; every server started is stopped, and its log checked, at teardown."""
    servers: list[Server] = []

    def start(
        example: str,
        *,
        script: bool = False,
        command: list[str] | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> Server:
        """`example` by this interpreter's uvicorn (or as a script), or by `command` plus a port."""
        port = free_port()
        env = {**environ, "PYTHONUNBUFFERED": "1", "PORT": str(port)}
        env.pop("DJANGO_SETTINGS_MODULE", None)  # asgi.py sets its own unless one is given
        if command is not None:
            argv = [*command, "--port", str(port)]
        elif script:
            argv = [sys.executable, "-W", "error", SCRIPTS[example]]
        else:
            argv = [sys.executable, "-W", "error", "-m", "uvicorn", EXAMPLES[example]]
            argv += ["--host", "127.0.0.1", "--port", str(port)]
        log = tmp_path / f"{example}-{len(servers)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        server = Server(f"http://127.0.0.1:{port}", log, process)
        servers.append(server)
        wait_until_listening(server, port)
        return server

    yield start

    stopped = [stop(server) for server in servers]
    for server, graceful in zip(servers, stopped, strict=True):
        text = server.log_text()
        assert graceful, f"the server ignored SIGTERM:\n{text}"
        # uvicorn re-raises the SIGTERM it handled once the graceful shutdown is done.
        assert server.process.returncode in (0, -signal.SIGTERM), text
        assert "Finished server process" in text, text
        assert "Traceback" not in text, text


def assert_completion(response: httpx.Response, tier: str, rest: dict[str, Any]) -> None:
    """A good answer for `tier` to a request whose body, minus the tier, was `rest`."""
    assert response.status_code == 200, response.text
    model = response.headers["x-tier-model"]
    assert model in MODELS[tier]
    assert response.headers["x-tier"] == tier
    assert response.headers["x-tier-provider"] == PROVIDER_OF[tier, model]
    assert response.headers["x-tier-attempts"] == "1"
    answer = response.json()
    assert answer["object"] == "chat.completion"
    assert answer["model"] == model
    said = rest["messages"][-1]["content"]
    assert answer["choices"][0]["message"]["content"] == f"Hello from {model}! You said: {said}"
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    # The provider got the chosen model from the endpoint's SDK call (and no tier field).
    received = answer["x_fake_provider"]["received"]
    assert (received["model"], received["messages"]) == (model, rest["messages"])
    assert "tier" not in received


@pytest.mark.parametrize("example", EXAMPLES)
def test_tier_requests_are_routed(start_server: Callable[..., Server], example: str) -> None:
    server = start_server(example)
    with client(server) as http:
        rest: dict[str, Any] = {"messages": MESSAGES, "temperature": 0.5}
        response = http.post("/v1/chat/completions", json={"tier": "simple", **rest})
        assert_completion(response, "simple", rest)

        rest = {"messages": MESSAGES}
        response = http.post("/v1/chat/completions", json=rest, headers={"x-tier": "Moderate"})
        assert_completion(response, "moderate", rest)

        response = http.post("/v1/chat/completions", json={"model": "tier:complex", **rest})
        assert_completion(response, "complex", rest)

        response = http.post("/v1/chat/completions", json={"tier": "expert"})
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_tier"

    if example == "django":
        # Django's handler refuses the lifespan scope; uvicorn's `--lifespan auto` just says so.
        assert "ASGI 'lifespan' protocol appears unsupported." in server.log_text()


@pytest.mark.parametrize("example", EXAMPLES)
def test_failing_model_is_retried_on_the_other_one(
    start_server: Callable[..., Server], example: str
) -> None:
    server = start_server(example)
    body = {"tier": "simple", "messages": MESSAGES}
    with client(server) as http:
        failing = http.post("/admin/fail", json={"model": "gpt-4o-mini", "status": 503})
        assert failing.json() == {"failing": {"gpt-4o-mini": 503}}

        # The draw is random (equal weights): until gpt-4o-mini is drawn and fails, requests may
        # go straight to gemini. The chance that 60 requests never draw it is 2**-60.
        attempts = []
        for _ in range(60):
            response = http.post("/v1/chat/completions", json=body)
            assert response.status_code == 200
            assert response.headers["x-tier-model"] == "gemini-2.0-flash"
            assert response.json()["model"] == "gemini-2.0-flash"
            attempts.append(response.headers["x-tier-attempts"])
            if attempts[-1] == "2":
                break
        assert attempts[-1] == "2"
        assert set(attempts[:-1]) <= {"1"}

        # gpt-4o-mini is backed off now: nothing is retried any more.
        for _ in range(3):
            response = http.post("/v1/chat/completions", json=body)
            assert response.headers["x-tier-model"] == "gemini-2.0-flash"
            assert response.headers["x-tier-attempts"] == "1"

        # The other one fails too: its own answer reaches the client. No request gets past it,
        # so once three distinct requests agree, the middleware answers 503 itself.
        http.post("/admin/fail", json={"model": "gemini-2.0-flash", "status": 502})
        for n in range(3):
            distinct = {**body, "messages": [{"role": "user", "content": f"question {n}"}]}
            response = http.post("/v1/chat/completions", json=distinct)
            assert response.status_code == 502
            assert response.headers["x-tier-model"] == "gemini-2.0-flash"
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "service_unavailable"
        assert 1 <= int(response.headers["retry-after"]) <= 30

        assert http.post("/admin/recover", json={}).json() == {"failing": {}}


@pytest.mark.parametrize("example", EXAMPLES)
def test_stream_reaches_the_client_as_server_sent_events(
    start_server: Callable[..., Server], example: str
) -> None:
    server = start_server(example)
    body = {
        "tier": "complex",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": MESSAGES,
    }
    with client(server) as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        # Streamed, not buffered into one body of known length.
        assert response.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in response.headers
        model = response.headers["x-tier-model"]
        assert model in MODELS["complex"]
        assert response.headers["x-tier-attempts"] == "1"
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]

    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 5
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks} == {model}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == f"Hello from {model}! You said: hi there"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == len(text.split())


@pytest.mark.parametrize("example", SCRIPTS)
def test_example_runs_as_a_script(start_server: Callable[..., Server], example: str) -> None:
    server = start_server(example, script=True)
    body = {"tier": "simple", "messages": MESSAGES}
    with client(server) as http:
        assert_completion(
            http.post("/v1/chat/completions", json=body), "simple", {"messages": MESSAGES}
        )


@pytest.mark.parametrize("example", EXAMPLES)
def test_metrics_and_status_answer_at_their_paths(
    start_server: Callable[..., Server], example: str
) -> None:
    server = start_server(example)
    with client(server) as http:
        body = {"tier": "simple", "messages": MESSAGES}
        assert http.post("/v1/chat/completions", json=body).status_code == 200

        metrics = http.get("/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        assert value(parse(metrics.text), "llm_tier_requests_total", tier="simple") == 1
        status = http.get("/status")
        assert status.status_code == 200
        [router] = status.json()["routers"]
        assert router["config"]["version"] == TIERS.version

        for path in ("/metrics/", "/status/"):
            answer = http.get(path)
            if example == "django":  # asgi.py dispatches by path, trailing slash or not
                assert answer.status_code == 200, path
            else:  # Starlette's rule for every route: the other spelling redirects to it
                assert answer.status_code == 307, path
                assert answer.headers["location"] == server.url + path.rstrip("/")


def test_a_real_prometheus_scrapes_the_fastapi_example_at_metrics(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = start_server("fastapi")
    with client(server) as http:
        body = {"tier": "simple", "messages": MESSAGES}
        assert http.post("/v1/chat/completions", json=body).status_code == 200

    target = server.url.removeprefix("http://")
    with prometheus(tmp_path, target, "/metrics") as api:

        def scraped() -> dict[str, Any] | None:
            targets = api.get("/api/v1/targets").json()["data"]["activeTargets"]
            return next((t for t in targets if t["health"] != "unknown"), None)

        scrape = until(scraped, "Prometheus never scraped the target")
        assert (scrape["health"], scrape["lastError"]) == ("up", "")
        assert scrape["scrapeUrl"] == f"{server.url}/metrics"

        def sample() -> list[Any]:
            query = {"query": 'llm_tier_requests_total{tier="simple"}'}
            result: list[Any] = api.get("/api/v1/query", params=query).json()["data"]["result"]
            return result

        [series] = until(sample, "our sample never reached Prometheus")
        assert series["metric"]["job"] == "tier"
        assert float(series["value"][1]) == 1


# -- the README's commands, as written, in a fresh virtual environment -----------------------------

README = (ROOT / "README.md").read_text()
# The install line beside the examples table, each example's `run` command, and the curl request.
README_INSTALL = re.findall(r"^pip install -e '\.\[examples\]'$", README, re.MULTILINE)
README_RUNS = re.findall(r"^\| `(examples/[^`]+)` \| `(uvicorn [^`]+)` \|", README, re.MULTILINE)
README_CURL = re.findall(
    r"^curl -si localhost:8000(/\S+) -H 'content-type: application/json' \\\n\s+-d '([^']+)'$",
    README,
    re.MULTILINE,
)


def test_the_readme_shows_what_the_next_test_runs() -> None:
    assert len(README_INSTALL) == 1
    assert [file for file, _ in README_RUNS] == [
        "examples/starlette_app.py",
        "examples/fastapi_app.py",
        "examples/django_project/",
    ]
    assert len(README_CURL) == 1


@pytest.fixture(scope="module")
def readme_venv(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A fresh virtual environment (one for the module: the install takes a while) in which the
    README's install line ran from the repository root; returns the environment that activates
    it, as `. .venv/bin/activate` would."""
    venv = tmp_path_factory.mktemp("readme") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["VIRTUAL_ENV"] = str(venv)
    # Without the test run's own environment: its uvicorn must not stand in for a missing one.
    ours = str(Path(sys.executable).parent)
    path = [p for p in env["PATH"].split(os.pathsep) if p != ours]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *path])
    [install] = README_INSTALL
    done = subprocess.run(shlex.split(install), cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert shutil.which("uvicorn", path=env["PATH"]) == str(venv / "bin" / "uvicorn")
    return env


@pytest.mark.parametrize(("example", "command"), README_RUNS)
def test_readme_commands_run_as_written(
    start_server: Callable[..., Server], readme_venv: dict[str, str], example: str, command: str
) -> None:
    server = start_server(Path(example).stem, command=shlex.split(command), environ=readme_venv)
    [(path, body)] = README_CURL
    with client(server) as http:
        response = http.post(path, content=body, headers={"content-type": "application/json"})
    rest = json.loads(body)
    assert_completion(response, rest.pop("tier"), rest)
