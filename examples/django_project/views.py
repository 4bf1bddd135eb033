"""A fake LLM provider as async Django views.

Ask for a tier instead of a model; the view receives the chosen model::

    curl -si localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
        -d '{"tier": "simple", "messages": [{"role": "user", "content": "hi"}]}'
    # also: -H 'x-tier: simple', or "model": "tier:simple"; "stream": true for server-sent events

The view reads the choice from the `x-tier-model` request header the middleware adds (and the
rewritten `model` in the JSON body). Make a model fail, to watch the retry on another model::

    curl -s localhost:8000/admin/fail -d '{"model": "gpt-4o-mini", "status": 503}'
    curl -s localhost:8000/admin/recover -d '{}'          # every model answers again

A failed model stays in the middleware's backoff (30 s by default, then one probe request) even
after /admin/recover. The /admin paths are not routed, so the middleware leaves them untouched.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.http import require_POST

# model -> HTTP status the fake provider answers with instead of a completion
FAILING: dict[str, int] = {}


def _words(text: Any) -> int:
    return len(text.split()) if isinstance(text, str) else 0


def _reply(body: dict[str, Any], model: str) -> tuple[str, dict[str, int]]:
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    asked = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
    text = f"Hello from {model}! You said: {asked if isinstance(asked, str) else '...'}"
    prompt = sum(_words(m.get("content")) for m in messages)
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": _words(text),
        "total_tokens": prompt + _words(text),
    }
    return text, usage


@require_POST
async def chat_completions(request: HttpRequest) -> HttpResponse:
    body = json.loads(request.body or b"{}")
    # Set by the middleware when the request named a tier; absent on a plain `"model": "..."` call.
    model = request.headers.get("x-tier-model") or body.get("model") or "unknown"
    if model in FAILING:
        error = {"message": f"fake provider: {model} is failing", "type": "server_error"}
        return JsonResponse(
            {"error": {**error, "param": None, "code": FAILING[model]}}, status=FAILING[model]
        )

    text, usage = _reply(body, model)
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingHttpResponse(
            _chunks(ident, created, model, text, usage if include_usage else None),
            content_type="text/event-stream",
        )
    info: dict[str, Any] = {"received": body}
    if "x-tier" in request.headers:
        info |= {"tier": request.headers["x-tier"], "provider": request.headers["x-tier-provider"]}
    return JsonResponse(
        {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
            "x_fake_provider": info,
        }
    )


async def _chunks(
    ident: str, created: int, model: str, text: str, usage: dict[str, int] | None
) -> AsyncIterator[str]:
    """The reply as OpenAI `chat.completion.chunk` events, one per word, then `[DONE]`."""

    def event(delta: dict[str, str] | None, finish: str | None = None, **extra: Any) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        chunk = {"id": ident, "object": "chat.completion.chunk", "created": created}
        return f"data: {json.dumps({**chunk, 'model': model, 'choices': choices, **extra})}\n\n"

    yield event({"role": "assistant", "content": ""})
    for i, word in enumerate(text.split(" ")):
        yield event({"content": word if i == 0 else " " + word})
    yield event({}, "stop")
    if usage is not None:  # only when asked for with "stream_options": {"include_usage": true}
        yield event(None, usage=usage)
    yield "data: [DONE]\n\n"


@require_POST
async def fail(request: HttpRequest) -> HttpResponse:
    """{"model": "gpt-4o-mini", "status": 503}: that model answers `status` from now on."""
    body = json.loads(request.body)
    FAILING[body["model"]] = int(body.get("status", 503))
    return JsonResponse({"failing": FAILING})


@require_POST
async def recover(request: HttpRequest) -> HttpResponse:
    """{"model": "..."} recovers one model, {} all of them."""
    body = json.loads(request.body or b"{}")
    if "model" in body:
        FAILING.pop(body["model"], None)
    else:
        FAILING.clear()
    return JsonResponse({"failing": FAILING})
