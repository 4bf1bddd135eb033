import pytest

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
