"""Deadlines of one duration (attempt_timeout, body_timeout) for the tasks of a middleware.

One watchdog task serves every deadline of a `Deadlines`. All of them get the same duration, so
deadlines in start order are already sorted: a deque is the whole schedule, and a deadline costs
an append and a flag, where a timer each (`asyncio.timeout`, `loop.call_at`) costs a timer-heap
entry, several microseconds on the hot path. A deadline is settled when what it bounds is done
(an attempt's response start: a stream is bounded only until its first byte; a body read in
full); settled deadlines keep no task. An expired one cancels its task, and `absorb` takes that
cancellation back so the request can go on (to a retry, or an answer of our own).
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


class Deadlines:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._queue: deque[Deadline] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watcher: asyncio.Task[None] | None = None

    def start(self) -> Deadline | None:
        """A deadline for what the current task does now; None outside asyncio."""
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
