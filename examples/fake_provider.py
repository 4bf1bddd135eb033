"""The fake LLM provider the examples serve, without any web framework: each example wraps these
functions in its own framework's views, so what differs between them is only the integration.

It answers OpenAI chat completions (or `chat.completion.chunk` events when streaming) that echo
the model the endpoint received, and can be told to fail for a model.
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

    def completion(self, info: dict[str, Any]) -> dict[str, Any]:
        """The chat completion; `info` (what the endpoint learnt) goes in `x_fake_provider`."""
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
            "x_fake_provider": {"received": self.body, **info},
        }

    def cost(self, prices: Any) -> float:
        """What the call costs at a model's configured prices (a `ModelConfig`)."""
        return (
            self.usage["prompt_tokens"] * prices.input_price_per_million
            + self.usage["completion_tokens"] * prices.output_price_per_million
        ) / 1_000_000

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
