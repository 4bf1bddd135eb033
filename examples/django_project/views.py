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

from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.http import require_POST

from .. import fake_provider


@require_POST
async def chat_completions(request: HttpRequest) -> HttpResponse:
    body = json.loads(request.body or b"{}")
    # Set by the middleware when the request named a tier; absent on a plain `"model": "..."` call.
    model = request.headers.get("x-tier-model") or body.get("model") or "unknown"
    if model in fake_provider.FAILING:
        return JsonResponse(fake_provider.error(model), status=fake_provider.FAILING[model])
    reply = fake_provider.Reply(body, model)
    if reply.streamed:
        return StreamingHttpResponse(reply.chunks(), content_type="text/event-stream")
    info = {}
    if "x-tier" in request.headers:
        info = {"tier": request.headers["x-tier"], "provider": request.headers["x-tier-provider"]}
    return JsonResponse(reply.completion(info))


@require_POST
async def fail(request: HttpRequest) -> HttpResponse:
    return JsonResponse(fake_provider.fail(json.loads(request.body)))


@require_POST
async def recover(request: HttpRequest) -> HttpResponse:
    return JsonResponse(fake_provider.recover(json.loads(request.body or b"{}")))
