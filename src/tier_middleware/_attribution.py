"""Who is to blame for an attempt that went wrong: the model, the caller or the app.

A model's health must reflect the model, never the request. Two rules keep it so:

- `judge_status` and `judge_exception` turn what the app answered (a status, or an exception
  that carries one, as the official SDKs and HTTP clients raise) into one `Verdict`. Only a
  timeout, a connection error, or a status in `failure_statuses` (429 and 5xx by default) is the
  model's failure; any other 4xx is the caller's.
- A failure that the same request got past on another model is the first model's fault for sure.
  A failure the request never got past (every model it tried failed) is evidence, not proof:
  `Evidence` holds it until failures of `threshold` distinct request bodies agree, and a body
  that failed on two models is a suspect (a poison request) whose later failures count no more.

Duck typing only: the package imports no SDK and no HTTP client here.
"""

from __future__ import annotations

import email.utils
import enum
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

Key = tuple[str, str]


class Verdict(enum.Enum):
    SUCCESS = "success"
    MODEL_FAILURE = "model_failure"  # counts against the model (once confirmed or agreed)
    CALLER_ERROR = "caller_error"  # the request was at fault: health unchanged, no retry
    APP_ERROR = "app_error"  # the app failed on its own: health unchanged, no retry


def judge_status(status: int, failure_statuses: frozenset[int]) -> Verdict:
    if status < 400:
        return Verdict.SUCCESS
    if status in failure_statuses:
        return Verdict.MODEL_FAILURE
    return Verdict.CALLER_ERROR if status < 500 else Verdict.APP_ERROR


def status_of(exc: BaseException) -> int | None:
    """The HTTP status an exception carries: an int `status_code` (openai and anthropic
    `APIStatusError`, Starlette and FastAPI `HTTPException`) or `response.status_code` (httpx and
    httpx2 `HTTPStatusError`); None when it carries none, or not a plausible one."""
    status = getattr(exc, "status_code", None)
    if status is None:
        status = getattr(getattr(exc, "response", None), "status_code", None)
    if type(status) is not int or not 100 <= status <= 599:
        return None
    return status


def judge_exception(
    exc: BaseException, failure_statuses: frozenset[int]
) -> tuple[Verdict, float | None]:
    """The verdict on an exception that escaped the app, and the provider's Retry-After it
    carries (seconds), if any.

    An exception with a status is judged as a response with that status would be, except that a
    status below 400 means the provider answered and the app then failed (an app error). Any
    other exception (a timeout, a connection error, a plain crash) is a model failure.
    """
    status = status_of(exc)
    if status is None:
        return Verdict.MODEL_FAILURE, None
    if status < 400:
        return Verdict.APP_ERROR, None
    verdict = judge_status(status, failure_statuses)
    if verdict is not Verdict.MODEL_FAILURE:
        return verdict, None
    return verdict, _exception_retry_after(exc)


def _exception_retry_after(exc: BaseException) -> float | None:
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if headers is None:
        headers = getattr(exc, "headers", None)  # Starlette's HTTPException
    getter = getattr(headers, "get", None)
    if getter is None:
        return None
    try:
        # httpx and httpx2 Headers are case-insensitive; a plain dict is tried as written too.
        ms = getter("retry-after-ms") or getter("Retry-After-Ms")
        seconds = getter("retry-after") or getter("Retry-After")
    except Exception:
        return None
    return parse_retry_after(ms, seconds)


def retry_after_of(headers: Iterable[tuple[bytes, bytes]]) -> float | None:
    """A response's own Retry-After (`retry-after-ms` first) from ASGI headers, in seconds."""
    ms = seconds = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"retry-after-ms":
            ms = value
        elif lowered == b"retry-after":
            seconds = value
    if ms is None and seconds is None:
        return None
    return parse_retry_after(ms, seconds)


def parse_retry_after(ms: Any, seconds: Any) -> float | None:
    """Seconds from `retry-after-ms` (preferred) or `Retry-After` (seconds or an HTTP date)
    header values (str or bytes); None unless positive and finite."""
    value = _number(ms)
    if value is not None:
        value /= 1000.0
    else:
        text = _text(seconds)
        if text is None:
            return None
        value = _number(text)
        if value is None:
            try:
                value = email.utils.parsedate_to_datetime(text).timestamp() - time.time()
            except (TypeError, ValueError, IndexError, OverflowError):
                return None
    if not math.isfinite(value) or value <= 0:
        return None
    return value


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("latin-1").strip()
    return value.strip() if isinstance(value, str) else None


def _number(value: Any) -> float | None:
    text = _text(value)
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


class Evidence:
    """Failures that no request got past, waiting for agreement, and the bodies behind them.

    A failure counts against a model once failures on `threshold` distinct bodies, each within
    `window` seconds of the newest, agree; a body counts once per model however often it is sent
    again (client and SDK retries). A body that failed on two models is a suspect for `window`
    seconds after its last failure. A success of the model clears what was held against it.
    Memory stays bounded: at most `max_bodies` bodies, and `threshold` per model.
    """

    def __init__(
        self,
        threshold: int,
        window: float,
        clock: Callable[[], float],
        *,
        max_bodies: int = 4096,
    ) -> None:
        self.threshold = threshold
        self.window = window
        self.clock = clock
        self.max_bodies = max_bodies
        self.held: dict[Key, dict[int, float]] = {}  # model -> {fingerprint: when}
        # fingerprint -> (when it last failed, the models it failed on); oldest first
        self._bodies: OrderedDict[int, tuple[float, frozenset[Key]]] = OrderedDict()

    def __len__(self) -> int:
        """How many bodies are remembered (at most `max_bodies`)."""
        return len(self._bodies)

    def suspect(self, fingerprint: int) -> bool:
        entry = self._bodies.get(fingerprint)
        if entry is None:
            return False
        if self.clock() - entry[0] >= self.window:
            del self._bodies[fingerprint]
            return False
        return len(entry[1]) >= 2

    def add(self, key: Key, fingerprint: int) -> bool:
        """Hold a failure of model `key` on body `fingerprint` that the request never got past.
        True when it completes the agreement: the model should be backed off (and what was held
        against it is used up)."""
        now = self.clock()
        self._note_body(fingerprint, key, now)
        held = self.held.get(key)
        if held is None:
            held = self.held[key] = {}
        held[fingerprint] = now
        cutoff = now - self.window
        for old in [f for f, when in held.items() if when <= cutoff]:
            del held[old]
        if len(held) < self.threshold:
            return False
        del self.held[key]
        return True

    def pending(self, key: Key) -> int:
        """Distinct bodies whose failure on `key` waits for agreement now."""
        held = self.held.get(key)
        if not held:
            return 0
        cutoff = self.clock() - self.window
        return sum(1 for when in held.values() if when > cutoff)

    def clear(self, key: Key) -> None:
        self.held.pop(key, None)

    def _note_body(self, fingerprint: int, key: Key, now: float) -> None:
        bodies = self._bodies
        entry = bodies.pop(fingerprint, None)
        models = frozenset((key,)) if entry is None else entry[1] | {key}
        bodies[fingerprint] = (now, models)
        while len(bodies) > self.max_bodies:
            bodies.popitem(last=False)
