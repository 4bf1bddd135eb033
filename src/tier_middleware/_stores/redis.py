"""The Redis backend: sessions, the config copy, a lock and health shared by a fleet.

Every call is bounded: `socket_connect_timeout` for a new connection, `socket_timeout` for each
reply, the pool's wait for a free connection by `socket_timeout` too, and redis-py's retries are
switched off (its defaults would retry a dead server for seconds). The middleware falls back to
in-process state on a StoreError, so failing fast is the whole point; a broken connection is
dropped and the next call opens a new one, which is how the store recovers by itself after a
server restart.

A redis-py client belongs to the event loop it first ran in (its sockets, its pool's locks), so
the store keeps one client per running loop: an app built once and driven from several loops
(Starlette's TestClient without a `with` block, successive `asyncio.run()` calls, a loop per
thread) gets a client of its own in each. A client is closed in its own loop when that loop shuts
down (`asyncio.run`, anyio, uvicorn: every runner finalizes async generators), quietly.

Keys, under `prefix`:
  s:{key}                       a session: SessionRecord.dumps(), sliding TTL (PX)
  config                        hash {raw, fetched_at}; never expires
  lock:{name}                   a lock token (SET NX PX; released by compare-and-delete, held
                                longer by compare-and-PEXPIRE)
  health                        hash {provider "\\n" model: "failures:until"}
  probe:{provider}\\n{model}      a half-open probe lease (SET NX PX)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import secrets
import threading
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from .._health import MAX_RETRY_AFTER
from .base import Failure, HealthSnapshot, SessionRecord, Store

# Count a failure and extend the backoff exactly as HealthTracker.record_failure does
# (_health.backoff_step is the same rule in Python, line by line). Numbers travel as strings both
# ways: Redis truncates a Lua number reply to an integer, and Lua's tostring keeps only 14 digits,
# so '%.17g' is used to round-trip doubles exactly. A field is "failures:until:since"; one
# written by an older version ("failures:until") reads with since = 0, so its next failure steps.
_RECORD_FAILURE = """
local field = ARGV[1]
local initial = tonumber(ARGV[2])
local max_backoff = tonumber(ARGV[3])
local multiplier = tonumber(ARGV[4])
local threshold = tonumber(ARGV[5])
local retry_after = tonumber(ARGV[6])
local now = tonumber(ARGV[7])
local jitter_factor = tonumber(ARGV[8])
local max_retry_after = tonumber(ARGV[9])
local started = tonumber(ARGV[10])

local failures, ends, since = 0, 0, 0
local current = redis.call('HGET', KEYS[1], field)
if current then
  local first = string.find(current, ':', 1, true)
  if first then
    failures = tonumber(string.sub(current, 1, first - 1)) or 0
    local rest = string.sub(current, first + 1)
    local second = string.find(rest, ':', 1, true)
    if second then
      ends = tonumber(string.sub(rest, 1, second - 1)) or 0
      since = tonumber(string.sub(rest, second + 1)) or 0
    else
      ends = tonumber(rest) or 0
    end
  end
end
if ends > 0 and started < since then
  -- in flight when the current backoff began: one burst is one failure
  if retry_after > 0 then
    ends = math.max(ends, now + math.min(retry_after, max_retry_after))
  end
else
  failures = failures + 1
  local n = failures - threshold + 1
  if n >= 1 then
    local backoff = math.min(initial * multiplier ^ math.min(n - 1, 64), max_backoff)
    backoff = math.min(backoff * jitter_factor, max_backoff)
    if retry_after > 0 then
      backoff = math.max(backoff, math.min(retry_after, max_retry_after))
    end
    ends = now + backoff
    since = now
  end
end
local failures_s = string.format('%d', failures)
local until_s = string.format('%.17g', ends)
redis.call('HSET', KEYS[1], field, failures_s .. ':' .. until_s .. ':' .. string.format('%.17g', since))
return {failures_s, until_s}
"""

_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_HOLD_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


class _LoopGone(Exception):
    """Thrown into a client's closer when its loop was closed without finalizing it."""


@dataclass(slots=True)
class _Client:
    """The redis-py client of one event loop, its scripts, and what closes it with the loop."""

    loop: asyncio.AbstractEventLoop
    redis: Redis
    record_failure: AsyncScript
    unlock: AsyncScript
    hold_lock: AsyncScript
    closer: AsyncGenerator[None, None]


async def _close_with_loop(redis: Redis) -> AsyncGenerator[None, None]:
    """Suspended for the life of a client; the loop's runner finalizes it at shutdown (as it
    does every async generator), which closes the client in its own loop."""
    try:
        yield
    except _LoopGone:
        return  # nothing can run on a closed loop: its sockets go with the garbage collector
    except GeneratorExit:
        with contextlib.suppress(Exception):  # quietly: the server may be gone already
            await redis.aclose()
        raise


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _float(value: float) -> str:
    return repr(float(value))  # shortest text that parses back to the same double


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _snapshot(fields: Mapping[bytes | str, bytes | str]) -> HealthSnapshot:
    snapshot: HealthSnapshot = {}
    for field, value in fields.items():
        provider, sep, model = _text(field).partition("\n")
        failures, colon, rest = _text(value).partition(":")
        if not sep or not colon:
            continue
        until = rest.partition(":")[0]
        try:
            snapshot[(provider, model)] = (int(failures), float(until))
        except ValueError:
            continue  # not ours: skip rather than fail every sync
    return snapshot


class RedisStore(Store):
    """A `Store` on Redis (redis://, rediss:// or unix:// URL), via `redis.asyncio`.

    `clock` (wall-clock seconds) is kept for symmetry with MemoryStore: every time-dependent
    decision here is made by Redis (TTLs) or passed in (`now`). `session_count` is None:
    counting keys is not cheap in Redis.
    """

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "tier:",
        socket_timeout: float = 0.1,
        connect_timeout: float = 0.1,
        max_connections: int = 64,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.prefix = prefix
        self.clock = clock
        # A blocking pool: a burst beyond max_connections waits (at most socket_timeout) for a
        # connection instead of failing at once. NO retries, pinned explicitly: redis-py 8's
        # Redis(host=...) defaults to 10 retries with backoff (11 attempts, ~4.6 s against a
        # silent server even with socket_timeout=0.1) and only its from_url path defaults to
        # none. With 0 retries, retry_on_timeout/retry_on_error (e.g. from URL query options)
        # only widen which errors would be retried and add no attempt.
        self._new_pool = functools.partial(
            BlockingConnectionPool.from_url,
            url,
            max_connections=max_connections,
            timeout=socket_timeout,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 0),
            retry_on_error=[],
            health_check_interval=0,
            decode_responses=False,
        )
        # Built now so that a bad URL fails here; it opens nothing until the first command, and
        # serves the first loop that asks.
        self._spare: BlockingConnectionPool | None = self._new_pool()
        self._current: _Client | None = None  # the last loop's: the one check of the hot path
        self._clients: dict[asyncio.AbstractEventLoop, _Client] = {}
        self._lock = threading.Lock()  # loops in several threads may open clients at once
        self._config_key = f"{prefix}config"
        self._health_key = f"{prefix}health"

    # -- one client per event loop ---------------------------------------------------------------

    async def _client(self) -> _Client:
        loop = asyncio.get_running_loop()
        current = self._current
        if current is not None and current.loop is loop:
            return current
        client = self._clients.get(loop)
        if client is None:
            client = await self._open(loop)
        self._current = client
        return client

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Client:
        with self._lock:
            pool, self._spare = self._spare or self._new_pool(), None
            gone = [c for c in self._clients.values() if c.loop.is_closed()]
            for old in gone:
                del self._clients[old.loop]
        for old in gone:
            _abandon(old)
        redis: Redis = Redis.from_pool(pool)  # the client owns (and closes) the pool
        closer = _close_with_loop(redis)
        await closer.asend(None)  # now the loop knows it, and finalizes it at shutdown
        client = _Client(
            loop,
            redis,
            redis.register_script(_RECORD_FAILURE),
            redis.register_script(_UNLOCK),
            redis.register_script(_HOLD_LOCK),
            closer,
        )
        with self._lock:
            self._clients[loop] = client
        return client

    # -- sessions ------------------------------------------------------------------------------

    async def get_session(self, key: str, ttl: float) -> SessionRecord | None:
        redis = (await self._client()).redis
        raw = await redis.getex(f"{self.prefix}s:{key}", px=_ms(ttl))
        return None if raw is None else SessionRecord.loads(raw)

    async def put_session(self, key: str, record: SessionRecord, ttl: float) -> None:
        redis = (await self._client()).redis
        await redis.set(f"{self.prefix}s:{key}", record.dumps(), px=_ms(ttl))

    async def get_session_and_health(
        self, key: str, ttl: float
    ) -> tuple[SessionRecord | None, HealthSnapshot]:
        # One round trip: both commands go out in one write (no MULTI: nothing to make atomic).
        redis = (await self._client()).redis
        async with redis.pipeline(transaction=False) as pipe:
            pipe.getex(f"{self.prefix}s:{key}", px=_ms(ttl))
            pipe.hgetall(self._health_key)
            raw, fields = await pipe.execute()
        record = None if raw is None else SessionRecord.loads(raw)
        return record, _snapshot(fields)

    # -- the config copy -------------------------------------------------------------------------

    async def get_config(self) -> tuple[bytes, float] | None:
        redis = (await self._client()).redis
        raw, fetched_at = await redis.hmget(self._config_key, ["raw", "fetched_at"])
        if raw is None or fetched_at is None:
            return None
        try:
            return (raw if isinstance(raw, bytes) else raw.encode()), float(fetched_at)
        except ValueError:
            return None

    async def put_config(self, raw: bytes, fetched_at: float) -> None:
        # A hash without expiry: a TTL must never erase the last-known-good config.
        redis = (await self._client()).redis
        await redis.hset(self._config_key, mapping={"raw": raw, "fetched_at": _float(fetched_at)})

    async def try_lock(self, name: str, ttl: float) -> str | None:
        token = secrets.token_hex(16)
        redis = (await self._client()).redis
        taken = await redis.set(f"{self.prefix}lock:{name}", token, nx=True, px=_ms(ttl))
        return token if taken else None

    async def unlock(self, name: str, token: str) -> None:
        unlock = (await self._client()).unlock
        await unlock(keys=[f"{self.prefix}lock:{name}"], args=[token])

    async def hold_lock(self, name: str, token: str, ttl: float) -> bool:
        hold = (await self._client()).hold_lock
        return bool(await hold(keys=[f"{self.prefix}lock:{name}"], args=[token, _ms(ttl)]))

    # -- health ---------------------------------------------------------------------------------

    async def health_snapshot(self) -> HealthSnapshot:
        redis = (await self._client()).redis
        return _snapshot(await redis.hgetall(self._health_key))

    async def _record_failure(
        self, provider: str, model: str, failure: Failure
    ) -> tuple[int, float]:
        retry_after, config = failure.retry_after, failure.config
        if retry_after is None or not math.isfinite(retry_after) or retry_after <= 0:
            retry_after = -1.0
        script = (await self._client()).record_failure
        failures, until = await script(
            keys=[self._health_key],
            args=[
                f"{provider}\n{model}",
                _float(config.initial_backoff),
                _float(config.max_backoff),
                _float(config.multiplier),
                str(config.failure_threshold),
                _float(retry_after),
                _float(failure.now),
                _float(failure.jitter_factor),
                _float(MAX_RETRY_AFTER),
                _float(failure.started),
            ],
        )
        return int(failures), float(until)

    async def record_success(self, provider: str, model: str) -> None:
        redis = (await self._client()).redis
        await redis.hdel(self._health_key, f"{provider}\n{model}")

    async def try_probe(self, provider: str, model: str, ttl: float) -> bool:
        key = f"{self.prefix}probe:{provider}\n{model}"
        redis = (await self._client()).redis
        return bool(await redis.set(key, b"1", nx=True, px=_ms(ttl)))

    async def release_probe(self, provider: str, model: str) -> None:
        redis = (await self._client()).redis
        await redis.delete(f"{self.prefix}probe:{provider}\n{model}")

    # -- lifecycle --------------------------------------------------------------------------------

    async def ping(self) -> bool:
        try:
            return bool(await (await self._client()).redis.ping())
        except Exception:
            return False

    async def aclose(self) -> None:
        """Close every client: this loop's now, another running loop's in that loop, a closed
        loop's is left to the garbage collector. The store opens a new one if used again."""
        with self._lock:
            clients, self._clients, self._current = list(self._clients.values()), {}, None
        here = asyncio.get_running_loop()
        for client in clients:
            if client.loop is here:
                await client.closer.aclose()
            elif client.loop.is_closed():
                _abandon(client)
            else:
                with contextlib.suppress(RuntimeError):  # it closed meanwhile
                    asyncio.run_coroutine_threadsafe(client.closer.aclose(), client.loop)


def _abandon(client: _Client) -> None:
    """Finish the closer of a client whose loop is closed, without running anything on it (a
    closer left suspended would make the garbage collector call into that closed loop)."""
    with contextlib.suppress(StopIteration, StopAsyncIteration, RuntimeError):
        client.closer.athrow(_LoopGone()).send(None)
