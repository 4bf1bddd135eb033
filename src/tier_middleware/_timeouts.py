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


class _Schedule:
    """The deadlines of one event loop, in start order, and its watchdog task."""

    __slots__ = ("loop", "queue", "watcher")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: deque[Deadline] = deque()
        self.watcher: asyncio.Task[None] | None = None

    async def watch(self) -> None:
        queue = self.queue
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
            if self.watcher is asyncio.current_task():
                self.watcher = None


class Deadlines:
    """Deadlines of `timeout` seconds. Each event loop gets a schedule of its own (an app built
    once may be driven from several loops, in turn or in threads at once): a watchdog only ever
    touches the tasks of its own loop."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._current: _Schedule | None = None  # the last loop's: the one check of the hot path
        self._schedules: dict[asyncio.AbstractEventLoop, _Schedule] = {}

    def start(self) -> Deadline | None:
        """A deadline for what the current task does now; None outside asyncio."""
        loop = _running_loop()
        task = asyncio.current_task(loop) if loop is not None else None
        if loop is None or task is None:
            return None
        schedule = self._current
        if schedule is None or schedule.loop is not loop:
            schedule = self._schedule(loop)
        queue = schedule.queue
        while queue and queue[0].task is None:  # settled at the front: nothing to watch
            queue.popleft()
        deadline = Deadline(time.monotonic() + self.timeout, task)
        queue.append(deadline)
        if schedule.watcher is None:
            schedule.watcher = loop.create_task(schedule.watch())
        return deadline

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> _Schedule:
        schedules = self._schedules
        schedule = schedules.get(loop)
        if schedule is None:
            for gone in [old for old in schedules if old.is_closed()]:
                del schedules[gone]  # what a closed loop held is gone with it
            schedule = schedules[loop] = _Schedule(loop)
        self._current = schedule
        return schedule

    async def aclose(self) -> None:
        """Stop this loop's watchdog (lifespan shutdown)."""
        loop = _running_loop()
        schedule = self._schedules.pop(loop, None) if loop is not None else None
        if self._current is schedule:
            self._current = None
        if schedule is None:
            return
        watcher, schedule.watcher = schedule.watcher, None
        schedule.queue.clear()
        if watcher is not None and not watcher.done():
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
