"""UsageTap (token usage read from JSON bodies and event streams) and the status app."""

from __future__ import annotations

import gc
import json
import math
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from _clock import FakeClock
from tier_middleware import HealthConfig, HealthTracker, TierConfig, TierRouter
from tier_middleware._status import (
    register_status_source,
    registered_status_sources,
    status_app,
    unregister_status_source,
)
from tier_middleware._usage import (
    MAX_EVENT,
    MAX_JSON_BODY,
    JsonUsageTap,
    SseUsageTap,
    UsageTap,
    _usage_of,
)

JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream")]


def tap_for(headers: list[tuple[bytes, bytes]], status: int = 200) -> UsageTap:
    tap = UsageTap.for_response(status, headers)
    assert tap is not None
    return tap


def run(headers: list[tuple[bytes, bytes]], *chunks: bytes) -> tuple[int, int] | None:
    tap = tap_for(headers)
    for chunk in chunks:
        tap.feed(chunk)
    return tap.result()


def sse(*events: Any, end: str = "\n") -> bytes:
    """An event stream: each event is a dict (sent as JSON), or str data sent as is."""
    out = []
    for event in events:
        data = event if isinstance(event, str) else json.dumps(event)
        out.append(f"data: {data}{end}{end}")
    return "".join(out).encode()


def openai_chunk(text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
        "usage": None,
    }


OPENAI_USAGE = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "choices": [],
    "usage": {"prompt_tokens": 17, "completion_tokens": 42, "total_tokens": 59},
}

OPENAI_STREAM = sse(openai_chunk("Hel"), openai_chunk("lo"), OPENAI_USAGE, "[DONE]")

ANTHROPIC_STREAM = (
    b"event: message_start\n"
    + b"data: "
    + json.dumps(
        {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "role": "assistant",
                "content": [],
                "usage": {"input_tokens": 25, "output_tokens": 1},
            },
        }
    ).encode()
    + b"\n\n"
    + b'event: ping\ndata: {"type": "ping"}\n\n'
    + b"event: content_block_delta\n"
    + b'data: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}\n\n'
    + b"event: message_delta\n"
    + b'data: {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 15}}\n\n'
    + b'event: message_stop\ndata: {"type": "message_stop"}\n\n'
)


# -- choosing a tap ------------------------------------------------------------------------------


def test_json_and_sse_responses_get_a_tap() -> None:
    assert isinstance(UsageTap.for_response(200, JSON), JsonUsageTap)
    assert isinstance(UsageTap.for_response(200, SSE), SseUsageTap)
    assert isinstance(
        UsageTap.for_response(201, [(b"Content-Type", b"application/json; charset=utf-8")]),
        JsonUsageTap,
    )
    assert isinstance(
        UsageTap.for_response(200, [(b"content-type", b"text/event-stream;charset=utf-8")]),
        SseUsageTap,
    )
    assert isinstance(
        UsageTap.for_response(200, [(b"content-type", b"application/vnd.api+json")]), JsonUsageTap
    )
    assert isinstance(
        UsageTap.for_response(200, {"Content-Type": "application/json"}), JsonUsageTap
    )


@pytest.mark.parametrize("status", [100, 103, 199, 301, 304, 400, 429, 500, 503])
def test_non_2xx_gets_no_tap(status: int) -> None:
    assert UsageTap.for_response(status, JSON) is None
    assert UsageTap.for_response(status, SSE) is None


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(b"content-type", b"text/html")],
        [(b"content-type", b"text/plain")],
        [(b"content-type", b"application/octet-stream")],
        [(b"content-type", b"image/png")],
        [(b"content-type", b"application/jsonx")],
        [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")],
        [(b"content-type", b"text/event-stream"), (b"content-encoding", b"br")],
    ],
)
def test_other_responses_get_no_tap(headers: list[tuple[bytes, bytes]]) -> None:
    assert UsageTap.for_response(200, headers) is None


def test_identity_encoding_is_not_compression() -> None:
    assert isinstance(
        UsageTap.for_response(
            200, [(b"content-type", b"application/json"), (b"content-encoding", b"identity")]
        ),
        JsonUsageTap,
    )


# -- JSON bodies ----------------------------------------------------------------------------------


def test_json_openai_usage() -> None:
    body = {
        "id": "chatcmpl-1",
        "choices": [{"message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
    }
    assert run(JSON, json.dumps(body).encode()) == (12, 7)


def test_json_anthropic_usage() -> None:
    body = {
        "id": "msg_1",
        "type": "message",
        "content": [{"type": "text", "text": "hi"}],
        "usage": {"input_tokens": 30, "output_tokens": 9, "cache_read_input_tokens": 0},
    }
    assert run(JSON, json.dumps(body).encode()) == (30, 9)


def test_json_openai_responses_and_gemini_usage() -> None:
    responses = {"object": "response", "usage": {"input_tokens": 5, "output_tokens": 6}}
    gemini = {"candidates": [], "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 3}}
    assert run(JSON, json.dumps(responses).encode()) == (5, 6)
    assert run(JSON, json.dumps(gemini).encode()) == (8, 3)


def test_json_with_only_input_tokens_counts_zero_output() -> None:
    # Embeddings report prompt tokens only.
    body = {"object": "list", "data": [], "usage": {"prompt_tokens": 8, "total_tokens": 8}}
    assert run(JSON, json.dumps(body).encode()) == (8, 0)


def test_json_split_anywhere() -> None:
    raw = json.dumps({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()
    for i in range(len(raw) + 1):
        assert run(JSON, raw[:i], b"", raw[i:]) == (3, 4)
    assert run(JSON, *[raw[i : i + 1] for i in range(len(raw))]) == (3, 4)


def test_json_integral_floats_count() -> None:
    assert run(JSON, b'{"usage": {"prompt_tokens": 12.0, "completion_tokens": 0}}') == (12, 0)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b'{"usage": {"prompt_tokens": 3, "completion',  # cut
        b"[1, 2, 3]",
        b'"text"',
        b"{}",
        b'{"usage": null}',
        b'{"usage": "12"}',
        b'{"usage": {}}',
        b'{"usage": {"total_tokens": 5}}',
        b'{"usage": {"prompt_tokens": "12", "completion_tokens": 3}}',
        b'{"usage": {"prompt_tokens": -1, "completion_tokens": 3}}',
        b'{"usage": {"prompt_tokens": 1.5, "completion_tokens": 3}}',
        b'{"usage": {"prompt_tokens": true, "completion_tokens": 3}}',
        b'{"usage": {"prompt_tokens": null, "completion_tokens": 3}}',
        b'{"usage": {"input_tokens": 3, "output_tokens": [4]}}',
        b'{"usage": {"prompt_tokens": 1e300, "completion_tokens": 3}}',
        b'{"usage": {"prompt_tokens": 99999999999999999999999, "completion_tokens": 3}}',
        b'{"usage": {"prompt_tokens": NaN, "completion_tokens": 3}}',
        b"\xff\xfe{",
    ],
)
def test_json_bad_usage_is_ignored(body: bytes) -> None:
    assert run(JSON, body) is None


def test_json_over_the_cap_gives_up_and_frees_memory() -> None:
    tap = tap_for(JSON)
    head = b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}, "pad": "'
    tap.feed(head)
    assert tap.buffered == len(head)
    tap.feed(b"x" * MAX_JSON_BODY)
    assert tap.buffered == 0
    tap.feed(b'"}')
    assert tap.buffered == 0
    assert tap.result() is None


def test_json_result_is_computed_once() -> None:
    tap = tap_for(JSON)
    tap.feed(b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}}')
    assert tap.result() == (1, 2)
    assert tap.buffered == 0
    tap.feed(b"more")  # after the end: ignored
    assert tap.result() == (1, 2)


def test_json_keeps_a_copy_of_mutable_chunks() -> None:
    tap = tap_for(JSON)
    chunk = bytearray(b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}}')
    tap.feed(chunk)  # type: ignore[arg-type]
    chunk[:] = b"garbage"
    assert tap.result() == (1, 2)


# -- JSON bodies: the tap against a plain statement of the rules -------------------------------
#
# `JsonUsageTap.result` reads the common shape inline and searches for `"usage` from the end of
# the body; `spec` is the rule written out without shortcuts, on the full msgspec decode (the
# parse the tap must agree with: a body it cannot decode has no usage, wherever the fault is).

SPEC_KEYS = (
    ("usage", "prompt_tokens", "completion_tokens"),
    ("usage", "input_tokens", "output_tokens"),
    ("usageMetadata", "promptTokenCount", "candidatesTokenCount"),
)


def spec_count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError
        value = int(value)
    if not 0 <= value <= 1 << 53:
        raise ValueError
    return value


def spec_counts(obj: Any) -> tuple[int | None, int | None] | None:
    """The first holder (the object, its `message`, its `response`) and the first key pair (in
    SPEC_KEYS order) with either key present decide; a bad value there means no usage."""
    if not isinstance(obj, dict):
        return None
    for holder in (obj, obj.get("message"), obj.get("response")):
        if not isinstance(holder, dict):
            continue
        for field, input_key, output_key in SPEC_KEYS:
            usage = holder.get(field)
            if isinstance(usage, dict) and (input_key in usage or output_key in usage):
                try:
                    return (
                        spec_count(usage[input_key]) if input_key in usage else None,
                        spec_count(usage[output_key]) if output_key in usage else None,
                    )
                except ValueError:
                    return None
    return None


def spec(body: bytes) -> tuple[tuple[int, int] | None, str | None]:
    """(usage, model) of a whole JSON body, as `JsonUsageTap` must report them."""
    if b'"usage' not in body:
        return None, None
    try:
        reply = msgspec.json.decode(body)
    except Exception:
        return None, None
    model = reply.get("model") if isinstance(reply, dict) else None
    counts = spec_counts(reply)
    usage = None if counts is None else (counts[0] or 0, counts[1] or 0)
    return usage, model if isinstance(model, str) else None


def tapped(*chunks: bytes) -> tuple[tuple[int, int] | None, str | None]:
    tap = JsonUsageTap()
    for chunk in chunks:
        tap.feed(chunk)
    first = tap.result()
    assert tap.result() == first  # computed once
    return first, tap.model


COUNT_KEYS = [k for _, i, o in SPEC_KEYS for k in (i, o)]
valid_counts = st.integers(min_value=0, max_value=100_000)
bad_counts = st.one_of(
    st.sampled_from([0, 1 << 53, (1 << 53) + 1, 1 << 64, -1, 12.0, 12.5, -0.0, 1e300, True]),
    st.none(),
    st.text(max_size=4),
)
counts = st.integers(0, 3).flatmap(lambda k: valid_counts if k else bad_counts)  # 3 in 4 valid
leaves = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
)
# Text that looks like usage, for strings (message content, ids): the search must not be fooled.
lures = st.sampled_from(
    [
        '"usage": {"prompt_tokens": 5, "completion_tokens": 6}',
        '{"usage":{"input_tokens":1,"output_tokens":2}}',
        '"usageMetadata": {"promptTokenCount": 3}',
        '"usage": null',
        '\\"usage\\": {',
        '"usage',
    ]
)
usage_objects = st.one_of(
    # a provider's shape: one key pair (either key may be missing), maybe more fields after
    st.sampled_from(SPEC_KEYS).flatmap(
        lambda keys: st.fixed_dictionaries(
            {}, optional={keys[1]: counts, keys[2]: counts, "total_tokens": counts}
        )
    ),
    st.dictionaries(
        st.sampled_from([*COUNT_KEYS, "total_tokens", "prompt_tokens_details"]), counts, max_size=4
    ),
)
members = st.sampled_from(
    ["usage", "usageMetadata", "message", "response", "model", "choices", "content", "id"]
) | st.text(max_size=6)


def members_of(draw: st.DrawFn, depth: int) -> list[tuple[str, Any]]:
    """An object's members as (name, value) pairs: names may repeat (the last one counts)."""
    out: list[tuple[str, Any]] = []
    for _ in range(draw(st.integers(0, 5))):
        name = draw(members)
        if name in ("usage", "usageMetadata"):
            value = draw(st.one_of(usage_objects, leaves, st.just({})))
        elif name in ("message", "response", "choices") and depth < 2:
            value = dict(members_of(draw, depth + 1))
            if name == "choices":
                value = [value]
        elif name == "model":
            value = draw(st.text(max_size=8) | st.integers() | st.none())
        else:
            value = draw(leaves | lures)
        out.append((name, value))
    return out


def encode(members: list[tuple[str, Any]], draw: st.DrawFn) -> bytes:
    """A JSON object from pairs, repeated names kept, with drawn spacing and escaping."""
    ascii_only = draw(st.booleans())
    space = draw(st.sampled_from(["", " ", "\n", "\t ", "\r\n  "]))
    parts = [
        json.dumps(name, ensure_ascii=ascii_only)
        + space
        + ":"
        + space
        + json.dumps(value, ensure_ascii=ascii_only, indent=draw(st.sampled_from([None, 1])))
        for name, value in members
    ]
    return ("{" + space + ("," + space).join(parts) + space + "}").encode()


@st.composite
def reply_bodies(draw: st.DrawFn) -> bytes:
    pairs = members_of(draw, 0)
    if draw(st.booleans()):
        pairs.insert(0, ("model", draw(st.text(max_size=8))))
    if draw(st.integers(0, 3)):  # as replies are: usage last (or just before an extra member)
        keys = draw(st.sampled_from(SPEC_KEYS))
        shaped = {keys[1]: draw(counts), keys[2]: draw(counts), "total_tokens": 1}
        pairs.insert(
            len(pairs) - draw(st.sampled_from([0, 0, 0, 1])) if pairs else 0, (keys[0], shaped)
        )
    body = encode(pairs, draw)
    damage = draw(st.sampled_from(["none"] * 6 + ["cut", "byte", "insert", "tail", "wrap"]))
    if damage == "cut":
        body = body[: draw(st.integers(0, len(body)))]
    elif damage == "byte" and body:
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + bytes([draw(st.integers(0, 255))]) + body[at + 1 :]
    elif damage == "insert":
        at = draw(st.integers(0, len(body)))
        extra = draw(
            st.sampled_from([b"\xff", b"\\", b'"', b",", b"}", b" ", b"\xc3\xa9", b"1e400"])
        )
        body = body[:at] + extra + body[at:]
    elif damage == "tail":
        body += draw(st.sampled_from([b" ", b"\n", b"x", b"}", b',"usage":{}']))
    elif damage == "wrap":
        body = b"[" + body + b"]"
    return body


ADVERSARIAL = [
    # usage text inside message content, with and without real usage after it
    b'{"choices":[{"message":{"content":"\\"usage\\": {\\"prompt_tokens\\": 9, '
    b'\\"completion_tokens\\": 9}"}}]}',
    b'{"choices":[{"message":{"content":"the \\"usage\\" of words"}}],'
    b'"usage":{"prompt_tokens":3,"completion_tokens":4}}',
    # a string ending in an escaped backslash, then usage
    b'{"content":"a\\\\","usage":{"prompt_tokens":3,"completion_tokens":4}}',
    # two usage members: the last one counts, wherever it is and whatever it holds
    b'{"usage":{"prompt_tokens":1,"completion_tokens":2},"usage":{"prompt_tokens":5,'
    b'"completion_tokens":6}}',
    b'{"usage":{"prompt_tokens":1,"completion_tokens":2},"usage":null}',
    b'{"usage":null,"usage":{"input_tokens":7}}',
    # usage not last, and nested only
    b'{"usage":{"input_tokens":1,"output_tokens":2},"model":"m","id":"x"}',
    b'{"message":{"usage":{"input_tokens":1,"output_tokens":2}},"model":"m"}',
    b'{"response":{"usage":{"input_tokens":1}},"usage":null}',
    b'{"usage":{"total_tokens":3},"usageMetadata":{"promptTokenCount":2}}',
    # whitespace everywhere
    b' \n{ "usage" :\r\n { "prompt_tokens" : 1 ,\t"completion_tokens" : 2 } } \n',
    # an escaped member name (no literal "usage in the body: not counted, like before)
    b'{"us\\u0061ge":{"prompt_tokens":1,"completion_tokens":2}}',
    b'{"us\\u0061ge":{"prompt_tokens":1,"completion_tokens":2},"x":"\\"usage"}',
    # fine usage, broken elsewhere: the body does not parse, so no usage
    b'{"x":"\xff","usage":{"prompt_tokens":1,"completion_tokens":2}}',
    b'{"x":1e400,"usage":{"prompt_tokens":1,"completion_tokens":2}}',
    b'{"x":[1,],"usage":{"prompt_tokens":1,"completion_tokens":2}}',
    b'{"usage":{"prompt_tokens":1,"completion_tokens":2}}}',
    b'{"usage":{"prompt_tokens":1,"completion_tokens":2}',
    b'[{"usage":{"prompt_tokens":1,"completion_tokens":2}}]',
    # counts on the edges of what is valid
    b'{"usage":{"prompt_tokens":9007199254740992,"completion_tokens":0}}',
    b'{"usage":{"prompt_tokens":9007199254740993,"completion_tokens":0}}',
    b'{"usage":{"prompt_tokens":-0,"completion_tokens":1e2}}',
    b'{"usage":{"prompt_tokens":1,"completion_tokens":false}}',
    b'{"model":7,"usage":{"prompt_tokens":1,"completion_tokens":2}}',
]


@pytest.mark.parametrize("body", ADVERSARIAL)
def test_json_adversarial_bodies_match_the_rule(body: bytes) -> None:
    assert tapped(body) == spec(body)
    assert tapped(*(body[i : i + 1] for i in range(len(body)))) == spec(body)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=reply_bodies(), cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6))
@example(body=ADVERSARIAL[1], cuts=[])
def test_json_tap_matches_the_rule_on_any_body(body: bytes, cuts: list[int]) -> None:
    points = sorted({c % (len(body) + 1) for c in cuts})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    assert tapped(*chunks) == spec(body)


@settings(max_examples=300, deadline=None)
@given(body=reply_bodies())
def test_event_usage_matches_the_rule(body: bytes) -> None:
    # Events are read with `_usage_of` on their decoded data: the same rule.
    try:
        obj = msgspec.json.decode(body)
    except Exception:
        return
    assert _usage_of(obj) == spec_counts(obj)


# -- event streams ----------------------------------------------------------------------------------


def test_sse_openai_final_usage_chunk() -> None:
    assert run(SSE, OPENAI_STREAM) == (17, 42)


def test_sse_without_usage_is_none() -> None:
    assert run(SSE, sse(openai_chunk("Hi"), "[DONE]")) is None


def test_sse_anthropic_message_start_and_delta_combine() -> None:
    assert run(SSE, ANTHROPIC_STREAM) == (25, 15)


def test_sse_openai_responses_completed_event() -> None:
    stream = sse(
        {"type": "response.created", "response": {"id": "r", "usage": None}},
        {"type": "response.output_text.delta", "delta": "Hi"},
        {
            "type": "response.completed",
            "response": {"id": "r", "usage": {"input_tokens": 11, "output_tokens": 4}},
        },
    )
    assert run(SSE, stream) == (11, 4)


def test_sse_last_usage_wins() -> None:
    first = {"usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    last = {"usage": {"prompt_tokens": 2, "completion_tokens": 3}}
    assert run(SSE, sse(first, openai_chunk("x"), last)) == (2, 3)


@pytest.mark.parametrize(
    "bad",
    [
        '{"usage": {"prompt_tokens": "9", "completion_tokens": 9}}',
        '{"usage": {"prompt_tokens": -9, "completion_tokens": 9}}',
        '{"usage": {"prompt_tokens": 9.5, "completion_tokens": 9}}',
        '{"usage": {"prompt_tokens": false, "completion_tokens": 9}}',
        '{"usage": {"prompt_tokens": 9, "completion_tokens": 9',  # malformed JSON
        '{"usage": {}}',
        '{"usage": {"prompt_tokens" 9}}',
    ],
)
def test_sse_bad_usage_is_ignored(bad: str) -> None:
    good = {"usage": {"prompt_tokens": 2, "completion_tokens": 3}}
    assert run(SSE, sse(bad)) is None
    assert run(SSE, sse(good, bad)) == (2, 3)
    assert run(SSE, sse(bad, good)) == (2, 3)


def test_sse_event_with_a_key_that_is_not_utf8_is_skipped_not_the_stream() -> None:
    broken = b'data: {"usage": {"prompt_tokens": 1, "\xff": 1}}\n\n'
    good = {"usage": {"prompt_tokens": 2, "completion_tokens": 3}}
    assert run(SSE, broken, sse(good)) == (2, 3)


def test_sse_multi_line_data_and_other_fields() -> None:
    stream = (
        b': a comment mentioning "usage": {\n'
        b"event: chunk\n"
        b"id: 7\n"
        b'data: {"usage":\n'
        b'data: {"prompt_tokens": 4,\n'
        b'data:"completion_tokens": 5}}\n'
        b"retry: 1000\n"
        b"\n"
    )
    assert run(SSE, stream) == (4, 5)


@pytest.mark.parametrize("end", ["\n", "\r\n", "\r"])
def test_sse_line_endings(end: str) -> None:
    stream = sse(openai_chunk("a"), OPENAI_USAGE, "[DONE]", end=end)
    assert run(SSE, stream) == (17, 42)
    assert run(SSE, *[stream[i : i + 1] for i in range(len(stream))]) == (17, 42)


def test_sse_cut_stream() -> None:
    full = OPENAI_STREAM
    cut_at = full.index(b'"usage": {"prompt_tokens"') + 10
    assert run(SSE, full[:cut_at]) is None
    # The final event complete except for its blank line: an unfinished event does not count.
    final = sse(OPENAI_USAGE)
    assert run(SSE, sse(openai_chunk("x")), final[:-1]) is None
    # An earlier complete event still counts.
    earlier = sse({"usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    assert run(SSE, earlier, full[:cut_at]) == (1, 1)


def test_sse_anthropic_cut_before_message_delta_keeps_message_start() -> None:
    cut = ANTHROPIC_STREAM.index(b"event: message_delta")
    assert run(SSE, ANTHROPIC_STREAM[:cut]) == (25, 1)


def test_feed_never_raises() -> None:
    for headers in (JSON, SSE):
        tap = tap_for(headers)
        tap.feed(None)  # type: ignore[arg-type]
        tap.feed("text")  # type: ignore[arg-type]
        tap.feed(12)  # type: ignore[arg-type]
        tap.result()


def test_sse_accepts_bytearray_and_memoryview() -> None:
    tap = tap_for(SSE)
    half = len(OPENAI_STREAM) // 2
    tap.feed(bytearray(OPENAI_STREAM[:half]))  # type: ignore[arg-type]
    tap.feed(memoryview(OPENAI_STREAM[half:]))  # type: ignore[arg-type]
    assert tap.result() == (17, 42)


STREAMS = {
    "openai": (OPENAI_STREAM, (17, 42)),
    "anthropic": (ANTHROPIC_STREAM, (25, 15)),
    "openai-crlf": (sse(openai_chunk("a"), OPENAI_USAGE, "[DONE]", end="\r\n"), (17, 42)),
    "openai-cr": (sse(openai_chunk("a"), OPENAI_USAGE, "[DONE]", end="\r"), (17, 42)),
    "anthropic-crlf": (ANTHROPIC_STREAM.replace(b"\n", b"\r\n"), (25, 15)),
}


@given(
    name=st.sampled_from(sorted(STREAMS)),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=40),
)
def test_sse_any_split_gives_the_same_result(name: str, cuts: list[int]) -> None:
    stream, expected = STREAMS[name]
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert b"".join(chunks) == stream
    assert run(SSE, *chunks) == expected


@given(sizes=st.lists(st.integers(min_value=1, max_value=97), min_size=1, max_size=30))
def test_sse_any_chunk_sizes(sizes: list[int]) -> None:
    stream, expected = STREAMS["anthropic-crlf"]
    chunks = []
    i = 0
    k = 0
    while i < len(stream):
        n = sizes[k % len(sizes)]
        chunks.append(stream[i : i + n])
        i += n
        k += 1
    assert run(SSE, *chunks) == expected


BIG_THEN_USAGE = sse(openai_chunk("w" * 2000), openai_chunk("x"), OPENAI_USAGE, "[DONE]")


@given(cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=40))
def test_sse_any_split_with_an_oversized_event(cuts: list[int]) -> None:
    # The 2 KB event is over the limit and dropped wherever the chunks end; the rest is read.
    stream = BIG_THEN_USAGE
    points = sorted({c % (len(stream) + 1) for c in cuts})
    tap = SseUsageTap(limit=512)
    for a, b in zip([0, *points], [*points, len(stream)], strict=True):
        tap.feed(stream[a:b])
        assert tap.buffered <= 512
    assert tap.result() == (17, 42)


# -- bounded memory ---------------------------------------------------------------------------------


def test_sse_memory_stays_bounded_over_50_mb() -> None:
    block = sse(*(openai_chunk("token " * (i % 7 + 1)) for i in range(400)))
    chunk_size = 8191  # not aligned with events
    target = 50 * 1024 * 1024
    tap = tap_for(SSE)
    fed = 0
    peak = 0
    data = block * 8  # a pattern longer than one chunk, sliced at shifting offsets
    offset = 0
    while fed < target:
        if offset + chunk_size > len(data):
            offset = 0
        tap.feed(data[offset : offset + chunk_size])
        offset += chunk_size
        fed += chunk_size
        peak = max(peak, tap.buffered)
    tap.feed(b"\n\n" + sse(OPENAI_USAGE))
    assert tap.result() == (17, 42)
    assert peak < 2048  # one unfinished event, never the stream
    assert tap.buffered == 0


def test_sse_an_oversized_event_is_dropped_and_reading_goes_on() -> None:
    tap = tap_for(SSE)
    tap.feed(b'data: {"usage": {"prompt_tokens": 1, "completion_tokens": 1}, "pad": "')
    for _ in range(4 * MAX_EVENT // 1000):
        tap.feed(b"y" * 999 + b"\n")  # single newlines: one never-ending event
        assert tap.buffered <= MAX_EVENT
    tap.feed(b'"}\n')
    tap.feed(b"\n")  # the oversized event ends here, split across chunks
    assert tap.buffered <= 1
    tap.feed(sse({"usage": {"prompt_tokens": 6, "completion_tokens": 7}}))
    assert tap.result() == (6, 7)
    assert tap.buffered == 0


def test_sse_oversized_event_boundary_inside_one_chunk() -> None:
    tap = SseUsageTap(limit=100)
    tap.feed(b"data: " + b"z" * 200)
    assert tap.buffered <= 100
    tap.feed(b"zzz\n\n" + sse({"usage": {"input_tokens": 3, "output_tokens": 4}}))
    assert tap.result() == (3, 4)


# -- the status app -----------------------------------------------------------------------------------


class Source:
    """A stand-in for the middleware as the status page sees it."""

    def __init__(
        self,
        name: str,
        router: TierRouter,
        sessions: int | None = 3,
        *,
        error: bool = False,
        hang: bool = False,
    ) -> None:
        self.name = name
        self.router = router
        self.config_source_name = "tiers.toml"
        self.sessions = sessions
        self.error = error
        self.hang = hang

    async def session_count(self) -> int | None:
        if self.hang:
            await anyio.sleep(30)
        if self.error:
            raise ConnectionError("redis is down")
        return self.sessions


def status_router(clock: FakeClock) -> TierRouter:
    config = TierConfig.load(
        {
            "version": "2024-06-01",
            "updated_at": "2024-06-01T12:00:00Z",
            "tiers": {
                "simple": [
                    {"provider": "openai", "model": "gpt-4o-mini", "relative_cost": 1},
                    {"provider": "anthropic", "model": "claude-haiku", "relative_cost": 2},
                    {"provider": "google", "model": "gemini-flash", "relative_cost": 4},
                ],
                "moderate": [{"provider": "openai", "model": "gpt-4o", "relative_cost": 5}],
                "complex": [
                    {"provider": "anthropic", "model": "claude-sonnet", "relative_cost": 10},
                    {"provider": "openai", "model": "o1", "relative_cost": 40},
                ],
            },
        }
    )
    return TierRouter(config, HealthTracker(HealthConfig(initial_backoff=30.0), clock=clock))


async def get(app: Any, path: str = "/", method: str = "GET") -> httpx.Response:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        return await client.request(method, path)


@pytest.mark.anyio
async def test_status_reports_probabilities_and_health() -> None:
    clock = FakeClock()
    router = status_router(clock)
    router.health.record_failure("anthropic", "claude-haiku")
    clock.advance(10)
    response = await get(status_app(Source("main", router)), "/status")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert len(body["routers"]) == 1
    entry = body["routers"][0]
    assert entry["name"] == "main"
    assert entry["config"] == {
        "version": "2024-06-01",
        "updated_at": "2024-06-01T12:00:00Z",
        "source": "tiers.toml",
    }
    assert entry["sessions"] == 3
    assert list(entry["tiers"]) == ["simple", "moderate", "complex"]
    for tier, rows in entry["tiers"].items():
        available = [r for r in rows if r["health"] != "backoff"]
        assert math.isclose(sum(r["probability"] for r in available), 1.0), tier
    simple = {r["model"]: r for r in entry["tiers"]["simple"]}
    assert [r["model"] for r in entry["tiers"]["simple"]] == [
        "gpt-4o-mini",
        "claude-haiku",
        "gemini-flash",
    ]
    assert simple["claude-haiku"] == {
        "provider": "anthropic",
        "model": "claude-haiku",
        "relative_cost": 2,
        "probability": 0.0,
        "health": "backoff",
        "consecutive_failures": 1,
        "backoff_remaining": 20.0,
        "unconfirmed_failures": 0,
    }
    # weights 1 and 1/4 among the two available models
    assert simple["gpt-4o-mini"]["probability"] == pytest.approx(0.8)
    assert simple["gemini-flash"]["probability"] == pytest.approx(0.2)
    assert simple["gpt-4o-mini"]["health"] == "available"
    assert simple["gpt-4o-mini"]["backoff_remaining"] is None
    assert simple["gpt-4o-mini"]["consecutive_failures"] == 0
    complex_ = {r["model"]: r["probability"] for r in entry["tiers"]["complex"]}
    assert complex_ == pytest.approx({"claude-sonnet": 0.8, "o1": 0.2})


@pytest.mark.anyio
async def test_status_after_the_backoff_shows_probing() -> None:
    clock = FakeClock()
    router = status_router(clock)
    router.health.record_failure("openai", "gpt-4o")
    app = status_app(Source("main", router))
    row = (await get(app)).json()["routers"][0]["tiers"]["moderate"][0]
    assert (row["health"], row["probability"], row["backoff_remaining"]) == ("backoff", 0.0, 30.0)
    clock.advance(31)
    row = (await get(app)).json()["routers"][0]["tiers"]["moderate"][0]
    assert (row["health"], row["probability"], row["backoff_remaining"]) == ("probing", 1.0, 0.0)
    assert row["consecutive_failures"] == 1


@pytest.mark.anyio
async def test_status_of_several_sources_and_unknown_session_counts() -> None:
    clock = FakeClock()
    sources = [
        Source("a", status_router(clock), sessions=None),
        Source("b", status_router(clock), error=True),
        Source("c", status_router(clock), hang=True),
        Source("d", status_router(clock), sessions=0),
    ]
    app = status_app(*sources, session_timeout=0.05)
    body = (await get(app)).json()
    assert [(r["name"], r["sessions"]) for r in body["routers"]] == [
        ("a", None),
        ("b", None),
        ("c", None),
        ("d", 0),
    ]


@pytest.mark.anyio
async def test_status_rejects_other_methods() -> None:
    app = status_app(Source("main", status_router(FakeClock())))
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        response = await get(app, "/", method)
        assert response.status_code == 405
        assert response.headers["allow"] == "GET, HEAD"
        assert "not allowed" in response.json()["error"]
    head = await get(app, "/", "HEAD")
    assert head.status_code == 200
    assert head.content == b""


@pytest.mark.anyio
async def test_status_uses_the_registered_sources() -> None:
    clock = FakeClock()
    first = Source("registered-first", status_router(clock))
    second = Source("registered-second", status_router(clock))
    register_status_source(first)
    register_status_source(second)
    register_status_source(first)  # again: no duplicate
    try:
        app = status_app()
        names = [r["name"] for r in (await get(app)).json()["routers"]]
        assert [n for n in names if n.startswith("registered-")] == [
            "registered-first",
            "registered-second",
        ]
        del second
        gc.collect()
        names = [r["name"] for r in (await get(app)).json()["routers"]]
        assert [n for n in names if n.startswith("registered-")] == ["registered-first"]
        unregister_status_source(first)
        assert first not in registered_status_sources()
        names = [r["name"] for r in (await get(app)).json()["routers"]]
        assert not [n for n in names if n.startswith("registered-")]
    finally:
        unregister_status_source(first)
