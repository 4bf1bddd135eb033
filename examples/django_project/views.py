"""An async Django chat view that calls its provider with the OpenAI SDK through
UpstreamTransport (../upstream.py); asgi.py serves the fake provider at /fake-provider.

Ask for a tier instead of a model; the view receives the chosen model::

    curl -si localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
        -d '{"tier": "simple", "messages": [{"role": "user", "content": "hi"}]}'
    # also: -H 'x-tier: simple', or "model": "tier:simple"; "stream": true for server-sent events

The view calls the provider with the rewritten `model` of the JSON body (also in the
`x-tier-model` request header). Make a model fail at the provider, to watch the retry on another
model::

    curl -s localhost:8000/admin/fail -d '{"model": "gpt-4o-mini", "status": 503}'
    curl -s localhost:8000/admin/recover -d '{}'          # every model answers again

A failed model stays in the middleware's backoff (30 s by default, then one probe request) even
after /admin/recover. The /admin paths are not routed, so the middleware leaves them untouched.
"""

from __future__ import annotations

import json

from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.http import require_POST

from .. import fake_provider, upstream


@require_POST
async def chat_completions(request: HttpRequest) -> HttpResponse:
    body = json.loads(request.body or b"{}")
    # The middleware chose the model: it is in body["model"] (and the x-tier-model header).
    # Call the provider with it, through the OpenAI SDK.
    base_url = request.build_absolute_uri("/fake-provider/v1")
    status, answer, headers = await upstream.ask(base_url, body)
    if status == 200 and not isinstance(answer, dict):
        return StreamingHttpResponse(answer, headers=headers)
    return JsonResponse(answer, status=status, headers=headers)


@require_POST
async def fail(request: HttpRequest) -> HttpResponse:
    return JsonResponse(fake_provider.fail(json.loads(request.body)))


@require_POST
async def recover(request: HttpRequest) -> HttpResponse:
    return JsonResponse(fake_provider.recover(json.loads(request.body or b"{}")))
