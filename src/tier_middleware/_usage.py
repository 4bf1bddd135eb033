"""Token usage read from a response as it passes, without changing it and in bounded memory.

`UsageTap.for_response` looks at the status and headers and returns None for anything that cannot
carry LLM usage (not 2xx, not JSON or server-sent events, compressed), so other responses cost
nothing. A JSON body is kept up to a cap and parsed once at the end; an event stream is parsed
event by event, keeping only the unfinished event.

Usage is read from `usage` (OpenAI chat: prompt_tokens/completion_tokens; Anthropic, OpenAI
responses: input_tokens/output_tokens), also when nested in `message` (Anthropic message_start)
or `response` (OpenAI responses events), and from Gemini's `usageMetadata`. In a stream, each
event with usage overrides the counts it carries, so Anthropic's message_start (input tokens)
and message_delta (output tokens) combine. Values that are not non-negative integers make the
whole usage object be ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import msgspec

# A JSON body larger than this is not kept: its usage is not counted.
MAX_JSON_BODY = 1 << 20
# An unfinished event larger than this is dropped (with the rest of that event): usage events
# are a few hundred bytes.
MAX_EVENT = 64 << 10
# Larger counts are not tokens of one response (and lose precision as floats).
_MAX_TOKENS = 1 << 53

_decode = msgspec.json.decode

# A usage object (not `"usage": null`): only events that match are parsed.
_USAGE_OBJECT = re.compile(rb'"(?:usage|usageMetadata)"\s*:\s*\{')

_KEYS = (
    ("usage", "prompt_tokens", "completion_tokens"),
    ("usage", "input_tokens", "output_tokens"),
    ("usageMetadata", "promptTokenCount", "candidatesTokenCount"),
)

Counts = tuple[int | None, int | None]


def _count(value: Any) -> int | None:
    """`value` as a token count; ValueError unless it is a non-negative integer (an integral
    float like 12.0 passes, a bool does not)."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        result = value
    elif isinstance(value, float) and value.is_integer():
        result = int(value)
    else:
        raise ValueError
    if not 0 <= result <= _MAX_TOKENS:
        raise ValueError
    return result


def _usage_of(obj: Any) -> Counts | None:
    """(input, output) from a parsed body or event; a count is None when absent, the whole
    result None when there is no usage object or it holds a bad value."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if type(usage) is dict:  # the common OpenAI shape, checked without the general search
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        if type(prompt) is int and type(completion) is int:
            if 0 <= prompt <= _MAX_TOKENS and 0 <= completion <= _MAX_TOKENS:
                return prompt, completion
            return None
    return _usage_in(obj)


def _usage_in(obj: dict[str, Any]) -> Counts | None:
    """`_usage_of` past its check of the common shape: the first usage object found, looking
    in `obj`, then in its `message` and `response`."""
    for holder in (obj, obj.get("message"), obj.get("response")):
        if not isinstance(holder, dict):
            continue
        for field, input_key, output_key in _KEYS:
            usage = holder.get(field)
            if not isinstance(usage, dict):
                continue
            if input_key not in usage and output_key not in usage:
                continue
            try:
                input_tokens = _count(usage[input_key]) if input_key in usage else None
                output_tokens = _count(usage[output_key]) if output_key in usage else None
            except ValueError:
                return None
            return input_tokens, output_tokens
    return None


def _media_type(
    headers: Iterable[tuple[bytes, bytes]] | Mapping[str, str],
) -> tuple[str | None, bool]:
    """The response's media type (lowercase, no parameters) and whether it is content-encoded."""
    pairs: Iterable[Any] = headers.items() if isinstance(headers, Mapping) else headers
    media: str | None = None
    encoded = False
    for name, value in pairs:
        key = name.decode("latin-1") if isinstance(name, bytes) else str(name)
        key = key.lower()
        if key == "content-type":
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            media = text.split(";", 1)[0].strip().lower()
        elif key == "content-encoding":
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            encoded = text.strip().lower() not in ("", "identity")
    return media, encoded


class UsageTap:
    """Reads token usage from a response body fed to it chunk by chunk.

    `feed` and `result` never raise. `buffered` is the number of body bytes held.
    """

    __slots__ = ()

    kind: ClassVar[str] = ""

    @staticmethod
    def for_response(
        status: int, headers: Iterable[tuple[bytes, bytes]] | Mapping[str, str]
    ) -> UsageTap | None:
        """A tap for a response with this status and these headers (ASGI `(name, value)` byte
        pairs or a str mapping), or None when it cannot carry usage."""
        try:
            if not 200 <= status < 300:
                return None
            media, encoded = _media_type(headers)
        except Exception:
            return None
        if media is None or encoded:
            return None
        return UsageTap._for_media(media)

    @staticmethod
    def for_content_type(
        status: int, content_type: bytes | None, content_encoding: bytes | None
    ) -> UsageTap | None:
        """`for_response` for a caller that already picked the two headers out (the middleware
        does while copying them): no other header is looked at."""
        if not 200 <= status < 300 or content_type is None:
            return None
        if content_encoding is not None and content_encoding.strip().lower() not in (
            b"",
            b"identity",
        ):
            return None
        if content_type == b"application/json":  # by far the most common: no decoding
            return JsonUsageTap()
        media = content_type.split(b";", 1)[0].strip().lower().decode("latin-1")
        return UsageTap._for_media(media)

    @staticmethod
    def _for_media(media: str) -> UsageTap | None:
        if media == "text/event-stream":
            return SseUsageTap()
        if media == "application/json" or (
            media.startswith("application/") and media.endswith("+json")
        ):
            return JsonUsageTap()
        return None

    def feed(self, chunk: bytes) -> None:
        raise NotImplementedError

    def result(self) -> tuple[int, int] | None:
        """(input_tokens, output_tokens), or None when the body reported no usable usage."""
        raise NotImplementedError

    @property
    def buffered(self) -> int:
        raise NotImplementedError


class JsonUsageTap(UsageTap):
    """A JSON body: chunks are kept (up to `limit` bytes) and parsed once, by `result`.

    The first chunk is held as it is and later ones in a list: most bodies come in one chunk,
    and then nothing else is allocated.
    """

    __slots__ = ("_first", "_more", "_reply", "_result", "_room")

    kind = "json"

    def __init__(self, limit: int = MAX_JSON_BODY) -> None:
        self._first = b""  # the first chunk
        self._more: list[bytes] | None = None  # the chunks after it, once there are any
        self._room = limit  # how many more bytes may be held; -1 once given up on, or parsed
        self._result: tuple[int, int] | None = None
        self._reply: Any = None  # the parsed body, once it is: `model` is read from it

    def feed(self, chunk: bytes) -> None:
        try:
            if not chunk or self._room < 0:
                return
            room = self._room - len(chunk)
            if room < 0:  # too big to be worth it: give up, free the memory
                self._give_up()
                return
            # bytes are immutable: keep a reference; copy only a mutable buffer.
            if type(chunk) is not bytes:
                chunk = bytes(chunk)
            if not self._first:
                self._first = chunk
            elif self._more is None:
                self._more = [chunk]
            else:
                self._more.append(chunk)
            self._room = room
        except Exception:
            self._give_up()

    def _give_up(self) -> None:
        self._room = -1
        self._first = b""
        self._more = None

    def result(self) -> tuple[int, int] | None:
        body = self._first
        if not body:  # nothing yet, given up on, or parsed already
            return self._result
        self._room = -1
        self._first = b""
        if self._more is not None:
            body = b"".join((body, *self._more))
            self._more = None
        # Most replies without usage are skipped without parsing ("usage", "usageMetadata").
        # Replies put their usage last: searching from the end finds it at once.
        if body.rfind(b'"usage') < 0:
            return None
        try:
            reply = _decode(body)
        except Exception:
            return None
        if type(reply) is dict:
            self._reply = reply
        counts = _usage_of(reply)
        if counts is not None:
            self._result = (counts[0] or 0, counts[1] or 0)
        return self._result

    @property
    def model(self) -> str | None:
        """The reply's "model" (for traces), once `result` has parsed the reply."""
        reply = self._reply
        model = None if reply is None else reply.get("model")
        return model if type(model) is str else None

    @property
    def buffered(self) -> int:
        return len(self._first) + sum(map(len, self._more or ()))


class SseUsageTap(UsageTap):
    """A server-sent event stream: complete events are inspected as they arrive; only the
    unfinished event is kept, up to `limit` bytes."""

    __slots__ = ("_after_cr", "_broken", "_input", "_limit", "_output", "_skipping", "_tail")

    kind = "sse"

    def __init__(self, limit: int = MAX_EVENT) -> None:
        self._tail = bytearray()  # the unfinished event, line endings normalized to \n
        self._limit = limit
        self._after_cr = False  # the last chunk ended in \r: a leading \n belongs to it
        self._skipping = False  # dropping an oversized event up to its end
        self._broken = False  # something unexpected happened: stop reading, keep what was found
        self._input: int | None = None
        self._output: int | None = None

    def feed(self, chunk: bytes) -> None:
        if self._broken:
            return
        try:
            self._feed(chunk)
        except Exception:
            self._broken = True
            self._tail = bytearray()

    def _feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        if type(chunk) is not bytes:
            chunk = bytes(chunk)
        if self._after_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
        if b"\r" in chunk:
            self._after_cr = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        else:
            self._after_cr = False
        tail = self._tail
        if not tail and not self._skipping:
            # The common case: the previous chunk ended with its event; scan this one in place.
            end = chunk.rfind(b"\n\n")
            if end < 0:
                self._keep(chunk)
                return
            self._scan(chunk, end)
            self._keep(chunk[end + 2 :])
            return
        # Search only what is new (and the last old byte): an event arriving in many small
        # chunks is not rescanned from its start each time.
        start = max(len(tail) - 1, 0)
        tail += chunk
        if self._skipping:
            end = tail.find(b"\n\n", start)
            if end < 0:
                del tail[:-1]  # keep the last byte: it may be the first half of "\n\n"
                return
            del tail[: end + 2]
            self._skipping = False
            start = 0
        end = tail.rfind(b"\n\n", start)
        if end < 0:
            self._trim()
            return
        complete = bytes(tail[:end])
        del tail[: end + 2]
        self._trim()
        self._scan(complete, len(complete))

    def _keep(self, rest: bytes) -> None:
        """Hold `rest`, the start of an unfinished event (the tail is empty)."""
        if rest:
            self._tail += rest
            self._trim()

    def _trim(self) -> None:
        """Drop an unfinished event that outgrew the limit, and the rest of it as it arrives."""
        if len(self._tail) > self._limit:
            del self._tail[:-1]  # keep the last byte: it may be the first half of "\n\n"
            self._skipping = True

    def _scan(self, complete: bytes, end: int) -> None:
        """Read the usage of the complete events in `complete[:end]`."""
        if _USAGE_OBJECT.search(complete, 0, end) is None:
            return
        if end != len(complete):
            complete = complete[:end]
        for event in complete.split(b"\n\n"):
            if _USAGE_OBJECT.search(event) is not None:
                self._event(event)

    def _event(self, event: bytes) -> None:
        data = [
            line[6:] if line.startswith(b"data: ") else line[5:]
            for line in event.split(b"\n")
            if line.startswith(b"data:")
        ]
        if not data:
            return
        try:
            counts = _usage_of(_decode(b"\n".join(data)))
        except (ValueError, RecursionError):  # msgspec.DecodeError, UnicodeDecodeError
            return
        if counts is None:
            return
        if counts[0] is not None:
            self._input = counts[0]
        if counts[1] is not None:
            self._output = counts[1]

    def result(self) -> tuple[int, int] | None:
        if self._input is None and self._output is None:
            return None
        return (self._input or 0, self._output or 0)

    @property
    def buffered(self) -> int:
        return len(self._tail)


__all__ = ["MAX_EVENT", "MAX_JSON_BODY", "JsonUsageTap", "SseUsageTap", "UsageTap"]
