import pytest

# A real redis-server (or REDIS_URL) and a black-hole listener, for tests/test_stores.py.
from redis_server import _redis_session_server, black_hole, fresh_redis_server, redis_server  # noqa: F401


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
