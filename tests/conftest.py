from collections.abc import AsyncIterator

import pytest

from config_harness import Make, managers
from control_plane import ControlPlane

# A real redis-server (or REDIS_URL), a black-hole listener, and `redis_url` (each test in memory
# and on Redis).
from redis_server import (  # noqa: F401
    _redis_session_server,
    black_hole,
    fresh_redis_server,
    redis_server,
    redis_url,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def control_plane(anyio_backend: str) -> AsyncIterator[ControlPlane]:
    """The test control plane (`control_plane.py`) on a loopback port."""
    async with ControlPlane() as cp:
        yield cp


@pytest.fixture
async def make(anyio_backend: str) -> AsyncIterator[Make]:
    """Builds ConfigManagers on hand-driven clocks (`config_harness.managers()`)."""
    async with managers() as build:
        yield build
