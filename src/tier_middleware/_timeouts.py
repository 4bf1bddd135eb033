"""attempt_timeout: an attempt whose response has not started in time is cancelled.

One watchdog task serves every attempt of a middleware. All attempts get the same timeout, so
deadlines in start order are already sorted: a deque is the whole schedule, and an attempt costs
an append and a flag, where a timer per attempt (`asyncio.timeout`, `loop.call_at`) costs a
timer-heap entry, several microseconds on the hot path. A deadline is settled at the response
start (a stream is bounded only until its first byte); settled deadlines keep no task.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque


class Deadline:
    __slots__ = ("at", "expired", "task")

    def __init__(self, at: float, task: asyncio.Task[object]) -> None:
        self.at = at
        self.task: asyncio.Task[object] | None = task  # None once settled or expired
        self.expired = False

    def settle(self) -> None:
        """The attempt started its response (or ended): the deadline no longer applies."""
        self.task = None

    def absorb(self) -> bool:
        """Whether this deadline cancelled the attempt; the first call takes back the cancel
        request from the task, so the request goes on (to a retry, or our own answer)."""
        if not self.expired:
            return False
        self.expired = False
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            task.uncancel()
        return True


class AttemptTimeouts:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._queue: deque[Deadline] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watcher: asyncio.Task[None] | None = None

    def start(self) -> Deadline | None:
        """A deadline for the attempt the current task makes now; None outside asyncio."""
        loop = _running_loop()
        task = asyncio.current_task(loop) if loop is not None else None
        if loop is None or task is None:
            return None
        queue = self._queue
        if loop is not self._loop:  # a new event loop: what the old one held is gone
            queue.clear()
            self._loop = loop
            self._watcher = None
        while queue and queue[0].task is None:  # settled at the front: nothing to watch
            queue.popleft()
        deadline = Deadline(time.monotonic() + self.timeout, task)
        queue.append(deadline)
        if self._watcher is None:
            self._watcher = loop.create_task(self._watch())
        return deadline

    async def _watch(self) -> None:
        queue = self._queue
        try:
            while queue:
                head = queue[0]
                if head.task is None:
                    queue.popleft()
                    continue
                delay = head.at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                    continue
                queue.popleft()
                task, head.task = head.task, None
                head.expired = True
                task.cancel()
        finally:
            if self._watcher is asyncio.current_task():
                self._watcher = None

    async def aclose(self) -> None:
        """Stop the watchdog (lifespan shutdown)."""
        watcher, self._watcher = self._watcher, None
        self._queue.clear()
        if watcher is not None and not watcher.done() and watcher.get_loop() is _running_loop():
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
