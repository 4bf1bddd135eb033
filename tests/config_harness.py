"""ConfigManagers on hand-driven clocks against the test control plane (`control_plane.py`), for
tests/test_control_plane.py and tests/test_config_manager.py. Their `control_plane` and `make`
fixtures live in conftest.py, the latter on top of `managers()`."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from _clock import FakeClock
from control_plane import ControlPlane
from tier_middleware import TierConfig
from tier_middleware._config_manager import ConfigManager, RefreshResult
from tier_middleware._control_plane import ControlPlaneSource

TTL = 100.0
REFRESH_AT = 80.0  # the default refresh_ahead (0.8) of TTL
RETRY = 30.0  # the default retry_interval: min(ttl, 30)


@dataclass
class Harness:
    manager: ConfigManager
    mono: FakeClock
    wall: FakeClock
    changes: list[TierConfig] = field(default_factory=list)
    results: list[RefreshResult] = field(default_factory=list)

    @property
    def versions(self) -> list[str]:
        return [c.version for c in self.changes]

    def advance(self, seconds: float) -> None:
        self.mono.advance(seconds)
        self.wall.advance(seconds)

    async def tick_after(self, seconds: float) -> None:
        """Move time on, make one request's tick and let any refresh it started finish."""
        self.advance(seconds)
        self.manager.tick()
        await self.manager.wait_idle()


Make = Callable[..., Harness]


@contextlib.asynccontextmanager
async def managers() -> AsyncIterator[Make]:
    """Build managers on fake clocks (shared between managers unless given); closed afterwards."""
    created: list[ConfigManager] = []
    shared_mono, shared_wall = FakeClock(1000.0), FakeClock(1_700_000_000.0)

    def build(source: Any, **kwargs: Any) -> Harness:
        mono = kwargs.pop("clock", shared_mono)
        wall = kwargs.pop("wall_clock", shared_wall)
        h = Harness(manager=None, mono=mono, wall=wall)  # type: ignore[arg-type]
        h.manager = ConfigManager(
            source,
            clock=mono,
            wall_clock=wall,
            on_change=h.changes.append,
            on_refresh=h.results.append,
            **kwargs,
        )
        created.append(h.manager)
        return h

    yield build
    for manager in created:
        await manager.aclose()


def cp_source(cp: ControlPlane, **kwargs: Any) -> ControlPlaneSource:
    kwargs.setdefault("ttl", TTL)
    return ControlPlaneSource(cp.url, **kwargs)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name == "tier_middleware" and r.levelno == logging.WARNING
    ]
