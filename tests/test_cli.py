"""The `tier-middleware` command, run as a real subprocess (`python -m tier_middleware`, and the
installed console script when it is there)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import pytest

from control_plane import ControlPlane, tier_payload
from tier_middleware import TierConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiers.toml"
CLI = [sys.executable, "-W", "error", "-m", "tier_middleware"]
SECRET = "cp-key-5be1d0c7-not-for-output"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


async def run_async(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """The CLI in a subprocess while this event loop keeps serving (the control plane)."""
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# -- parsing the `check` report ------------------------------------------------------------------


def check_tables(stdout: str) -> dict[str, dict[tuple[str, str], list[str]]]:
    """tier -> (provider, model) -> [rel cost, probability, in $/M, out $/M], from `check`."""
    tables: dict[str, dict[tuple[str, str], list[str]]] = {}
    current: dict[tuple[str, str], list[str]] | None = None
    for line in stdout.splitlines():
        if line and not line.startswith(" ") and " " not in line:
            current = tables[line] = {}
        elif line.startswith("  ") and current is not None and line.split()[0] != "provider":
            provider, model, *rest = line.split()
            current[(provider, model)] = rest
    return tables


def assert_matches(stdout: str, config: TierConfig) -> None:
    tables = check_tables(stdout)
    assert list(tables) == list(config.tier_order)
    for tier in config.tier_order:
        models = config.models(tier)
        total = sum(m.effective_weight for m in models)
        assert list(tables[tier]) == [m.key for m in models]
        for m in models:
            cost, chance, price_in, price_out = tables[tier][m.key]
            assert int(cost) == m.relative_cost
            assert chance == f"{m.effective_weight / total * 100:.1f}%"
            assert float(price_in) == pytest.approx(m.input_price_per_million)
            assert float(price_out) == pytest.approx(m.output_price_per_million)


# -- top level -----------------------------------------------------------------------------------


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"tier-middleware {version('tier-middleware')}"


@pytest.mark.parametrize("args", [["--help"], ["check", "--help"], ["demo", "--help"]])
def test_help(args: list[str]) -> None:
    result = run(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: tier-middleware")


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["check"],
        ["check", str(EXAMPLE), "--timeout", "0"],
        ["check", str(EXAMPLE), "--api-key-env", "CP_KEY"],
        ["demo", "--requests", "0"],
        ["demo", "--seed", "x"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert "usage: tier-middleware" in result.stderr
    assert result.stdout == ""


# -- check: files ----------------------------------------------------------------------------------


def test_check_example_toml() -> None:
    result = run("check", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    config = TierConfig.load(EXAMPLE)
    assert f"version  {config.version}" in result.stdout
    assert_matches(result.stdout, config)
    # Equal relative costs share a tier evenly.
    simple = check_tables(result.stdout)["simple"]
    assert [row[1] for row in simple.values()] == ["50.0%", "50.0%"]


def test_check_json_with_explicit_weights(tmp_path: Path) -> None:
    data = TierConfig.load(EXAMPLE).to_dict()
    data["version"] = "weighted-7"
    data["tiers"]["moderate"][0]["weight"] = 3.0  # overrides 1 / relative_cost
    path = tmp_path / "tiers.json"
    path.write_text(json.dumps(data))
    result = run("check", str(path))
    assert result.returncode == 0, result.stderr
    assert "version  weighted-7" in result.stdout
    assert_matches(result.stdout, TierConfig.load(path))


def test_check_invalid_config_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        "[[tiers.simple]]\n"
        'provider = "openai"\nmodel = "gpt-4o-mini"\nrelative_cost = 0\n'
        "[[tiers.moderate]]\n"
        'provider = "openai"\nmodel = "gpt-4o"\nrelative_cost = 5\n'
        "[[tiers.complex]]\n"
        'provider = "anthropic"\nmodel = "claude-opus"\nrelative_cost = 20\n'
    )
    result = run("check", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    message = result.stderr.strip()
    assert message.startswith("error: ")
    for part in ("bad.toml", "relative_cost", "'simple'", "openai/gpt-4o-mini"):
        assert part in message
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["tiers.yaml", "missing.toml"])
def test_check_unusable_file_exits_1(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name.endswith(".yaml"):
        path.write_text("version: 1\n")
    result = run("check", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert name in result.stderr
    assert ("'.yaml'" if name.endswith(".yaml") else "cannot read") in result.stderr
    assert "Traceback" not in result.stderr


# -- check: a control plane ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_check_control_plane(control_plane: ControlPlane) -> None:
    control_plane.serve("cp-42")
    code, out, err = await run_async(
        "check", control_plane.url, "--api-key-env", "CP_KEY", env={"CP_KEY": SECRET}
    )
    assert code == 0, err
    assert f"config   {control_plane.url}" in out
    assert "version  cp-42" in out
    assert "updated  2024-06-01T12:00:00Z" in out
    assert_matches(out, TierConfig.from_data(tier_payload("cp-42")))
    assert control_plane.hits == 1
    assert control_plane.requests[0].headers["authorization"] == f"Bearer {SECRET}"
    assert SECRET not in out + err


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        ("zero_cost", "relative_cost must be >= 1 (tier 'simple', model openai/gpt-4o-mini)"),
        ("error500", "HTTP 500"),
        ("html", "not JSON"),
        ("failure", "tier table is being migrated"),
    ],
)
async def test_check_control_plane_bad_answers_exit_1(
    control_plane: ControlPlane, behaviour: str, expected: str
) -> None:
    control_plane.behaviour = behaviour
    code, out, err = await run_async("check", control_plane.url)
    assert code == 1
    assert out == ""
    assert err.startswith("error: ")
    assert expected in err
    assert "Traceback" not in err


@pytest.mark.anyio
async def test_check_control_plane_timeout_exits_1(control_plane: ControlPlane) -> None:
    control_plane.behaviour = "slow"
    control_plane.delay = 10.0
    started = time.monotonic()
    code, _, err = await run_async("check", control_plane.url, "--timeout", "0.5")
    assert code == 1
    assert time.monotonic() - started < 8.0  # gave up well before the answer would come
    assert f"cannot reach the control plane at {control_plane.url}" in err
    assert "0.5s" in err


@pytest.mark.anyio
async def test_check_unreachable_url_exits_1(control_plane: ControlPlane) -> None:
    url = control_plane.url
    await control_plane.stop()  # nothing listens on that port now
    code, out, err = await run_async("check", url, "--timeout", "2")
    assert code == 1
    assert out == ""
    assert f"error: cannot reach the control plane at {url}" in err
    assert "Traceback" not in err


@pytest.mark.anyio
async def test_check_missing_api_key_exits_1(control_plane: ControlPlane) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CP_KEY_UNSET"}
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "check",
        control_plane.url,
        "--api-key-env",
        "CP_KEY_UNSET",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 1
    assert "CP_KEY_UNSET" in err.decode()
    assert control_plane.hits == 0


# -- demo --------------------------------------------------------------------------------------------


@dataclass
class Demo:
    stdout: str
    stderr: str
    seconds: float
    tiers: dict[str, list[int]]  # tier -> [requests, retries, 503s]
    # tier -> provider/model -> [picks, before, outage, after]
    picks: dict[str, dict[str, list[int]]]
    timeline: list[str]


def section(stdout: str, heading: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    body = []
    for line in lines[start + 1 :]:
        if not line:
            break
        body.append(line)
    return body


def run_demo(*args: str) -> Demo:
    started = time.monotonic()
    result = run("demo", *args)
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    out = result.stdout
    tiers = {}
    for line in section(out, "Requests by tier")[1:]:
        name, requests, retries, unavailable, _cost = line.split()
        tiers[name] = [int(requests), int(retries), int(unavailable)]
    picks: dict[str, dict[str, list[int]]] = {}
    tier = ""
    for line in section(out, "Model selections")[1:]:
        cells = line.split()
        if len(cells) == 1:
            tier = cells[0]
            picks[tier] = {}
        else:
            model, count, _share, before, outage, after, _cost = cells
            picks[tier][model] = [int(count), int(before), int(outage), int(after)]
    timeline = section(out, "Health timeline")
    return Demo(out, result.stderr, seconds, tiers, picks, timeline)


@pytest.fixture(scope="module")
def default_demo() -> Demo:
    return run_demo()


def test_demo_runs_quickly_and_quietly(default_demo: Demo) -> None:
    assert default_demo.seconds < 30.0  # about half a second in practice
    assert default_demo.stderr == ""
    assert "\r" not in default_demo.stdout  # no progress line when stdout is not a terminal
    for heading in ("Requests by tier", "Model selections", "Health timeline", "Clients:"):
        assert heading in default_demo.stdout
    assert default_demo.stdout.startswith("tier-middleware demo: 300 requests (seed 7)")


def test_demo_counts_add_up(default_demo: Demo) -> None:
    tiers = default_demo.tiers
    total = tiers.pop("total")
    assert list(tiers) == ["simple", "moderate", "complex"]
    assert sum(t[0] for t in tiers.values()) == total[0] == 300
    assert sum(t[1] for t in tiers.values()) == total[1]
    assert sum(t[2] for t in tiers.values()) == total[2]
    for name, (requests, retries, unavailable) in tiers.items():
        models = default_demo.picks[name].values()
        # Every request that was not answered 503 made one pick, and each retry one more.
        assert sum(m[0] for m in models) == requests - unavailable + retries
        assert all(m[0] == m[1] + m[2] + m[3] for m in models)
    assert f"Clients: {300 - total[2]} x 200 OK, {total[2]} errors" in default_demo.stdout


def test_demo_routes_around_the_outage(default_demo: Demo) -> None:
    down = {
        model: counts
        for models in default_demo.picks.values()
        for model, counts in models.items()
        if model.startswith("anthropic/")
    }
    assert len(down) == 3
    before = sum(c[1] for c in down.values())
    outage = sum(c[2] for c in down.values())
    after = sum(c[3] for c in down.values())
    assert outage < before
    assert outage < after
    # During the outage an anthropic pick is a failed probe (or first failure): each was retried
    # on another model, and nothing else failed.
    retries = sum(t[1] for name, t in default_demo.tiers.items() if name != "total")
    assert retries == outage > 0


def test_demo_timeline_shows_backoff_and_recovery(default_demo: Demo) -> None:
    timeline = default_demo.timeline
    text = "\n".join(timeline)
    assert re.search(r"^\s+50\.0s  anthropic goes down", text, re.M)
    assert re.search(r"^\s+100\.0s  anthropic is back up", text, re.M)
    failed = set(re.findall(r"(anthropic/\S+)\s+failed, backed off", text))
    recovered = re.findall(r"(anthropic/\S+)\s+probe ok, back in rotation", text)
    assert failed
    assert set(recovered) == failed
    assert "probe failed" in text  # a probe during the outage failed and doubled the backoff
    times = [float(line.split()[0].removesuffix("s")) for line in timeline]
    assert times == sorted(times)
    assert all(t > 100.0 for line, t in zip(timeline, times, strict=True) if "probe ok" in line)
    assert not any("openai/" in line or "google/" in line for line in timeline)


def test_demo_is_deterministic_per_seed() -> None:
    first = run_demo("--seed", "3", "--requests", "120")
    again = run_demo("--seed", "3", "--requests", "120")
    other = run_demo("--seed", "4", "--requests", "120")
    assert first.stdout == again.stdout
    assert first.stdout != other.stdout
    assert first.tiers["total"][0] == 120
    assert "anthropic is down from t=20.0s to t=40.0s" in first.stdout


# -- the console script ------------------------------------------------------------------------------


def test_console_script() -> None:
    script = Path(sys.executable).with_name("tier-middleware")
    if not script.exists():
        pytest.skip("the tier-middleware console script is not installed next to this Python")
    result = subprocess.run(
        [str(script), "check", str(EXAMPLE)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert_matches(result.stdout, TierConfig.load(EXAMPLE))
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == f"tier-middleware {version('tier-middleware')}"


def test_check_shows_where_each_provider_is_dispatched_and_never_a_key(tmp_path: Path) -> None:
    data = TierConfig.load(EXAMPLE).to_dict()
    data["providers"] = {
        "google": {
            "base_url": "https://generativelanguage.googleapis.com/v1beta/openai",
            "api_key_env": "GEMINI_KEY_CHECK",
            "auth_header": "x-goog-api-key",
        },
        "openai": {"baseUrl": "http://127.0.0.1:11434/v1"},  # no key (a local server)
    }
    path = tmp_path / "tiers.json"
    path.write_text(json.dumps(data))
    result = run("check", str(path), env={"GEMINI_KEY_CHECK": SECRET})
    assert result.returncode == 0, result.stderr
    providers = result.stdout.split("\nproviders\n", 1)[1].splitlines()
    assert providers[1].split() == [
        "google",
        "https://generativelanguage.googleapis.com/v1beta/openai",
        "GEMINI_KEY_CHECK",
        "x-goog-api-key",
    ]
    assert providers[2].split() == [
        "openai",
        "http://127.0.0.1:11434/v1",
        "(none)",
        "Authorization:",
        "Bearer",
    ]
    assert SECRET not in result.stdout + result.stderr
