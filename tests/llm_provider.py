"""A fake LLM provider for the official SDKs, and apps that call it the way teams write them.

`FakeProvider.handler` answers OpenAI chat completions (streamed too) and Anthropic messages;
plug it into an SDK as `httpx2.MockTransport(provider.handler)`, or serve `provider.asgi` under
uvicorn to reach it over loopback HTTP. What fails is decided per call by `rules`
(functions of (model, prompt) returning a status, or None to answer normally), so a test can
make one model sick, every model sick, or one prompt poison for every model.

`sdk_app` builds a real Starlette or FastAPI app whose chat endpoint calls the provider with
the real `openai` SDK: "unmapped" lets the SDK's exceptions propagate (what most endpoints
do), "mapped" catches `APIStatusError` and answers its status and Retry-After (the careful way).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx2
import openai
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asgi_harness import read_body
from tier_middleware import TierRoutingMiddleware

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"

Rule = Callable[[str, str], int | None]


def fails(model: str, status: int = 500) -> Rule:
    """`model` answers `status` to every call."""
    return lambda m, prompt: status if m == model else None


def poison(prompt: str, status: int = 500) -> Rule:
    """Every model answers `status` to this prompt."""
    return lambda m, p: status if p == prompt else None


def every_model(status: int = 500) -> Rule:
    return lambda m, p: status


@dataclass
class Call:
    url: str
    headers: dict[str, str]
    model: str


class FakeProvider:
    def __init__(self) -> None:
        self.rules: list[Rule] = []
        self.hits: list[str] = []  # the model of every call, in order
        self.calls: list[Call] = []
        # A streamed reply sends its first chunk, then waits for this before the rest.
        self.stream_gate: asyncio.Event | None = None
        self.failure_headers: dict[str, str] = {}  # sent with every failure
        # While set, calls wait here until `hold` of them are in flight (a burst that fails
        # together), then `on_release` runs (a test moves its clock: the calls took time).
        self.hold = 0
        self.in_flight = 0
        self.all_in = asyncio.Event()
        self.on_release: Callable[[], None] | None = None

    def status_for(self, model: str, prompt: str) -> int | None:
        for rule in self.rules:
            status = rule(model, prompt)
            if status is not None:
                return status
        return None

    async def handler(self, request: httpx2.Request) -> httpx2.Response:
        status, headers, content = await self._answer(
            str(request.url), dict(request.headers), request.content
        )
        return httpx2.Response(status, headers=headers, content=content)

    async def asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The same provider as a raw ASGI app, for uvicorn."""
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        url = f"http://{headers.get('host', '')}{scope['path']}"
        status, out, content = await self._answer(url, headers, body)
        raw = [(k.encode(), v.encode()) for k, v in out.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        if isinstance(content, bytes):
            await send({"type": "http.response.body", "body": content})
            return
        async for chunk in content:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def _answer(
        self, url: str, headers: dict[str, str], raw: bytes
    ) -> tuple[int, dict[str, str], bytes | AsyncIterator[bytes]]:
        body = json.loads(raw)
        model = body["model"]
        prompt = body["messages"][-1]["content"]
        self.hits.append(model)
        self.calls.append(Call(url, headers, model))
        if self.hold:
            self.in_flight += 1
            if self.in_flight >= self.hold and not self.all_in.is_set():
                if self.on_release is not None:
                    self.on_release()
                self.all_in.set()
            await self.all_in.wait()
        status = self.status_for(model, prompt)
        anthropic_api = url.endswith(MESSAGES)
        json_type = {"content-type": "application/json"}
        if status is not None:
            content = json.dumps(_error(status, anthropic_api)).encode()
            return status, {**json_type, **self.failure_headers}, content
        if body.get("stream"):
            return 200, {"content-type": "text/event-stream"}, self._events(model)
        return 200, json_type, json.dumps(_reply(model, anthropic_api)).encode()

    async def _events(self, model: str) -> AsyncIterator[bytes]:
        for n, text in enumerate(["Hel", "lo", "!"]):
            chunk = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
            }
            yield f"data: {json.dumps(chunk)}\n\n".encode()
            if n == 0 and self.stream_gate is not None:
                await self.stream_gate.wait()
        yield b"data: [DONE]\n\n"


def _error(status: int, anthropic_api: bool) -> dict[str, Any]:
    kind, message = (
        ("invalid_request_error", "maximum context length exceeded")
        if status == 400
        else ("server_error", f"upstream failed with {status}")
    )
    if anthropic_api:
        return {"type": "error", "error": {"type": kind, "message": message}}
    code = "context_length_exceeded" if status == 400 else None
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _reply(model: str, anthropic_api: bool) -> dict[str, Any]:
    if anthropic_api:
        return {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": "hello"}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 5, "output_tokens": 2},
        }
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


def _passed_on(exc: openai.APIStatusError | anthropic.APIStatusError) -> Response:
    """The careful mapping: the provider's status, body and Retry-After, passed on."""
    headers = {k: v for k, v in exc.response.headers.items() if k.startswith("retry-after")}
    return JSONResponse(exc.body, status_code=exc.status_code, headers=headers)


def sdk_app(
    framework: str,
    provider: FakeProvider,
    *,
    mapped: bool = False,
    sdk: str = "openai",
    max_retries: int = 0,
    **middleware: Any,
) -> Any:
    """A Starlette or FastAPI app behind TierRoutingMiddleware whose chat endpoint calls
    `provider` with the real SDK (`openai` chat completions or `anthropic` messages)."""
    http_client = httpx2.AsyncClient(transport=httpx2.MockTransport(provider.handler))
    openai_client = openai.AsyncOpenAI(
        api_key="sk-test",
        base_url="http://provider.test/v1",
        http_client=http_client,
        max_retries=max_retries,
    )
    anthropic_client = anthropic.AsyncAnthropic(
        api_key="sk-ant-test",
        base_url="http://provider.test",
        http_client=http_client,
        max_retries=max_retries,
    )

    async def chat(request: Request) -> Response:
        body = await request.json()
        try:
            if sdk == "anthropic":
                message = await anthropic_client.messages.create(
                    model=body["model"], max_tokens=64, messages=body["messages"]
                )
                return JSONResponse(message.model_dump())
            completion = await openai_client.chat.completions.create(
                model=body["model"], messages=body["messages"]
            )
            return JSONResponse(completion.model_dump())
        except (openai.APIStatusError, anthropic.APIStatusError) as exc:
            if not mapped:
                raise
            return _passed_on(exc)

    app: Starlette
    if framework == "fastapi":
        app = FastAPI()
        app.add_api_route(CHAT, chat, methods=["POST"])
    else:
        app = Starlette(routes=[Route(CHAT, chat, methods=["POST"])])
    middleware.setdefault("routes", [CHAT])
    app.add_middleware(TierRoutingMiddleware, **middleware)
    return app
