"""A backend's failure streak, reported the same way everywhere: every failure is counted, the
start of a streak is logged once as a warning, later failures at debug, the end once as info."""

from __future__ import annotations

import logging
from collections.abc import Callable

logger = logging.getLogger("tier_middleware")

# (backend name, operation): the metrics' `backend_error`.
OnBackendError = Callable[[str, str], object]


class Outage:
    __slots__ = ("down", "failing", "on_error", "up")

    def __init__(self, down: str, up: str, on_error: OnBackendError | None = None) -> None:
        self.down = down  # logged when a streak starts: what fails, and what is done instead
        self.up = up  # logged when it ends
        self.on_error = on_error
        self.failing = False

    def failed(self, backend: str, operation: str, exc: BaseException) -> None:
        if self.on_error is not None:
            try:
                self.on_error(backend, operation)
            except Exception:
                logger.exception("backend error callback failed")
        fields = {"backend": backend, "operation": operation, "error": str(exc)[:300]}
        if self.failing:
            logger.debug(self.down, extra=fields)
        else:
            self.failing = True
            logger.warning(self.down, extra=fields)

    def ok(self, backend: str) -> None:
        if self.failing:
            self.failing = False
            logger.info(self.up, extra={"backend": backend})
