"""ControlPlaneSource against a real HTTP control plane on a loopback port: what a fetch sends
and accepts, how each bad answer fails it, credentials and timeouts, and its validation.

A fetch is driven by a ConfigManager on fake clocks (`config_harness.py`), as the middleware
drives it; the only real waiting is for fetches to finish and for the (short) timeouts.
"""

from __future__ import annotations

import logging
import time

import pytest

from config_harness import REFRESH_AT, RETRY, Make, cp_source, warnings_of
from control_plane import ControlPlane
from tier_middleware._config_manager import ConfigManager
from tier_middleware._control_plane import ControlPlaneSource

pytestmark = pytest.mark.anyio

SECRET = "sk-live-7f3a9c1e-very-secret"
HEADER_SECRET = "tenant-token-4d2b8e"


# -- what a fetch sends and accepts --------------------------------------------------------------


async def test_first_load_reads_the_envelope_in_camel_case(
    control_plane: ControlPlane, make: Make
) -> None:
    h = make(cp_source(control_plane))
    m = h.manager
    assert m.current is None
    assert m.source_name == control_plane.url

    config = await m.ready()

    assert config is not None
    assert config is m.current
    assert config.version == "1"
    assert config.updated_at == "2024-06-01T12:00:00Z"
    mini = config.models("simple")[0]
    assert (mini.model, mini.relative_cost, mini.input_price_per_million) == (
        "gpt-4o-mini",
        1,
        0.15,
    )
    assert control_plane.hits == 1
    assert h.results == ["success"]
    assert h.changes == [config]
    assert m.origin == "control_plane"
    assert m.loaded_at == h.wall.now
    request = control_plane.requests[0]
    assert (request.method, request.path) == ("GET", "/api/v1/tiers/config")
    assert request.headers["accept"] == "application/json"
    assert "authorization" not in request.headers


async def test_a_payload_without_the_envelope_is_accepted(
    control_plane: ControlPlane, make: Make
) -> None:
    control_plane.behaviour = "bare"
    config = await make(cp_source(control_plane)).manager.ready()
    assert config is not None
    assert config.version == "1"


# -- every bad answer fails the fetch -------------------------------------------------------------

BAD_ANSWERS = {
    "html": "not JSON",
    "error500": "HTTP 500",
    "truncated": "RemoteProtocolError",
    "truncated_json": "not JSON",
    "bad_utf8": "not JSON",
    "failure": "reported failure: tier table is being migrated",
    "empty_tiers": "has no models",
    "zero_cost": "relative_cost must be >= 1",
    "slow": "no complete answer within 0.25s",
    "down": "ConnectError",
}


@pytest.mark.parametrize("behaviour", list(BAD_ANSWERS))
async def test_every_bad_answer_keeps_the_last_known_good_config(
    control_plane: ControlPlane, make: Make, behaviour: str
) -> None:
    h = make(cp_source(control_plane, timeout=0.25))
    good = await h.manager.ready()
    assert good is not None
    if behaviour == "down":
        await control_plane.stop()
    else:
        control_plane.behaviour = behaviour

    await h.tick_after(REFRESH_AT)

    assert h.manager.current is good
    assert h.manager.origin == "control_plane"
    assert h.results == ["success", "error"]
    assert h.changes == [good]
    assert h.manager.consecutive_failures == 1
    assert h.manager.last_error is not None
    assert BAD_ANSWERS[behaviour] in h.manager.last_error


# -- credentials ---------------------------------------------------------------------------------


async def test_the_api_key_is_sent_as_a_bearer_token_and_never_logged(
    control_plane: ControlPlane,
    make: Make,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, httpx and httpcore included
    monkeypatch.setenv("TIER_CP_KEY", SECRET)
    source = cp_source(
        control_plane, api_key_env="TIER_CP_KEY", headers={"X-Tenant-Token": HEADER_SECRET}
    )
    assert SECRET not in repr(source)
    assert HEADER_SECRET not in repr(source)
    h = make(source)

    await h.manager.ready()
    sent = control_plane.requests[-1].headers
    assert sent["authorization"] == f"Bearer {SECRET}"
    assert sent["x-tenant-token"] == HEADER_SECRET

    # The variable is read at every fetch: a rotated key is picked up without a restart.
    monkeypatch.setenv("TIER_CP_KEY", SECRET + "-rotated")
    await h.tick_after(REFRESH_AT)
    assert control_plane.requests[-1].headers["authorization"] == f"Bearer {SECRET}-rotated"

    for i, behaviour in enumerate(("error500", "html", "truncated", "failure")):
        control_plane.behaviour = behaviour
        await h.tick_after(REFRESH_AT if i == 0 else RETRY)
    await control_plane.stop()
    await h.tick_after(RETRY)
    assert control_plane.hits == 6

    # A missing or malformed key fails the refresh without a request (and names the variable).
    monkeypatch.delenv("TIER_CP_KEY")
    await h.tick_after(RETRY)
    assert h.manager.last_error is not None
    assert "TIER_CP_KEY" in h.manager.last_error
    monkeypatch.setenv("TIER_CP_KEY", "sk-line\nbreak-secret")
    await h.tick_after(RETRY)
    assert "valid header value" in (h.manager.last_error or "")
    assert control_plane.hits == 6
    assert h.results == ["success", "unchanged"] + ["error"] * 7

    assert warnings_of(caplog)  # the failures were logged...
    for record in caplog.records:  # ...and nothing logged holds a credential
        text = record.getMessage() + repr(record.__dict__)
        for secret in (SECRET, HEADER_SECRET, "sk-line", "break-secret"):
            assert secret not in text, f"{secret!r} leaked into log record {record.__dict__}"


# -- timeouts ------------------------------------------------------------------------------------


async def test_a_slow_control_plane_fails_within_its_timeout(
    control_plane: ControlPlane, make: Make
) -> None:
    control_plane.behaviour = "slow"
    h = make(cp_source(control_plane, timeout=0.3))

    start = time.perf_counter()
    config = await h.manager.ready()
    elapsed = time.perf_counter() - start

    assert config is None
    assert elapsed < 0.3 + 0.7, f"ready() took {elapsed:.2f}s"
    assert h.results == ["error"]
    assert "no complete answer within 0.3s" in (h.manager.last_error or "")


# -- validation ----------------------------------------------------------------------------------


def test_source_arguments_are_validated() -> None:
    for url in ("ftp://cp.example.com/config", "/api/v1/tiers/config", "cp.example.com"):
        with pytest.raises(ValueError, match="absolute http"):
            ControlPlaneSource(url)
    with pytest.raises(ValueError, match="timeout"):
        ControlPlaneSource("https://cp.example.com/x", timeout=0)
    with pytest.raises(ValueError, match="ttl"):
        ControlPlaneSource("https://cp.example.com/x", ttl=float("inf"))
    with pytest.raises(ValueError, match="api_key_env"):
        ControlPlaneSource("https://cp.example.com/x", api_key_env="")


def test_the_source_name_carries_no_credentials() -> None:
    source = ControlPlaneSource(
        "https://user:pa55word@cp.example.com:8443/api/v1/tiers/config?token=abc#frag",
        headers={"X-Api-Key": HEADER_SECRET},
    )
    expected = "https://cp.example.com:8443/api/v1/tiers/config"
    assert source.display_url == expected
    assert ConfigManager(source).source_name == expected
    assert repr(source) == (
        f"ControlPlaneSource({expected!r}, api_key_env=None, timeout=2.0, ttl=1800.0)"
    )
