"""The fake LLM provider the examples call, without any web framework: `app` is a plain ASGI app
that each example mounts at /fake-provider, and the examples' endpoints call it through the real
OpenAI SDK (see upstream.py), as they would call OpenAI.

It answers OpenAI chat completions (or `chat.completion.chunk` events when streaming) that echo
the model it was asked for, and can be told to fail for a model.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

# model -> HTTP status the fake provider answers with instead of a completion
FAILING: dict[str, int] = {}


def fail(body: dict[str, Any]) -> dict[str, Any]:
    """{"model": "gpt-4o-mini", "status": 503}: that model answers `status` from now on."""
    FAILING[body["model"]] = int(body.get("status", 503))
    return {"failing": FAILING}


def recover(body: dict[str, Any]) -> dict[str, Any]:
    """{"model": "..."} recovers one model, {} all of them."""
    if "model" in body:
        FAILING.pop(body["model"], None)
    else:
        FAILING.clear()
    return {"failing": FAILING}


def error(model: str) -> dict[str, Any]:
    """The OpenAI-shaped error body of a failing model."""
    message = f"fake provider: {model} is failing"
    return {
        "error": {"message": message, "type": "server_error", "param": None, "code": FAILING[model]}
    }


def _words(text: Any) -> int:
    return len(text.split()) if isinstance(text, str) else 0


class Reply:
    """The answer to one chat request for `model`: its text, token usage and ids."""

    def __init__(self, body: dict[str, Any], model: str) -> None:
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        asked = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
        self.body = body
        self.model = model
        self.text = f"Hello from {model}! You said: {asked if isinstance(asked, str) else '...'}"
        prompt = sum(_words(m.get("content")) for m in messages)
        completion = _words(self.text)
        self.usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    @property
    def streamed(self) -> bool:
        return bool(self.body.get("stream"))

    def completion(self) -> dict[str, Any]:
        """The chat completion; what the provider received goes in `x_fake_provider`."""
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.text},
                    "finish_reason": "stop",
                }
            ],
            "usage": self.usage,
            "x_fake_provider": {"received": self.body},
        }

    async def chunks(self) -> AsyncIterator[str]:
        """The reply as OpenAI `chat.completion.chunk` events, one per word, then `[DONE]`."""
        options = self.body.get("stream_options") or {}

        def event(delta: dict[str, str] | None, finish: str | None = None, **extra: Any) -> str:
            choices = (
                [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
            )
            chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created}
            return f"data: {json.dumps({**chunk, 'model': self.model, 'choices': choices, **extra})}\n\n"

        yield event({"role": "assistant", "content": ""})
        for i, word in enumerate(self.text.split(" ")):
            yield event({"content": word if i == 0 else " " + word})
        yield event({}, "stop")
        if options.get("include_usage"):  # asked for with "stream_options": {"include_usage": true}
            yield event(None, usage=self.usage)
        yield "data: [DONE]\n\n"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The provider: any POST gets a chat completion for the body's `model` (server-sent events
    with `"stream": true`), or that model's failure status while it is failing."""
    if scope["type"] != "http":
        return
    raw = b""
    while True:
        message = await receive()
        raw += message.get("body", b"")
        if not message.get("more_body"):
            break
    body = json.loads(raw or b"{}")
    model = body.get("model") or "unknown"
    if model in FAILING:
        await _send(send, FAILING[model], b"application/json", json.dumps(error(model)).encode())
        return
    reply = Reply(body, model)
    if not reply.streamed:
        await _send(send, 200, b"application/json", json.dumps(reply.completion()).encode())
        return
    start = {"type": "http.response.start", "status": 200}
    await send({**start, "headers": [(b"content-type", b"text/event-stream")]})
    async for event in reply.chunks():
        await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _send(send: Any, status: int, content_type: bytes, body: bytes) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
