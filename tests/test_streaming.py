"""Streams pass through unbuffered: proven on a real uvicorn server on loopback.

The app sends its second chunk only after the client has received the first, so a middleware
that buffered the response would deadlock and trip the deadline.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from configs import one_per_tier
from servers import serve
from tier_middleware import TierRoutingMiddleware

pytestmark = pytest.mark.anyio

CONFIG = one_per_tier()


def sse_app(release: asyncio.Event) -> Callable[..., Any]:
    async def events(request: Request) -> StreamingResponse:
        body = await request.json()

        async def produce() -> AsyncIterator[str]:
            yield f"data: {json.dumps({'model': body['model'], 'n': 1})}\n\n"
            await release.wait()  # the rest only once the client holds the first chunk
            for n in range(2, 5):
                yield f"data: {json.dumps({'n': n})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(produce(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/chat/completions", events, methods=["POST"])])
    app.add_middleware(TierRoutingMiddleware, config=CONFIG, routes=["/v1/chat/completions"])
    return app


async def test_sse_reaches_the_client_while_the_app_is_still_producing() -> None:
    release = asyncio.Event()
    received: list[bytes] = []
    async with serve(sse_app(release)) as url, httpx.AsyncClient(base_url=url) as client:
        with anyio.fail_after(5):
            async with client.stream(
                "POST", "/v1/chat/completions", json={"tier": "simple", "stream": True}
            ) as response:
                assert response.status_code == 200
                assert response.headers["x-tier-model"] == "mini"
                assert "content-length" not in response.headers
                async for chunk in response.aiter_raw():
                    received.append(chunk)
                    release.set()
    text = b"".join(received).decode()
    assert text.count("data: ") == 5
    assert '"model": "mini"' in received[0].decode()  # the app saw the rewritten body
    assert len(received) >= 2


async def test_raw_asgi_stream_chunks_are_forwarded_one_by_one() -> None:
    release = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await release.wait()
        await send({"type": "http.response.body", "body": b"data: 2\n\n", "more_body": False})

    middleware = TierRoutingMiddleware(app, config=CONFIG)
    async with serve(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        with anyio.fail_after(5):
            async with client.stream("POST", "/any", json={"model": "tier:complex"}) as response:
                chunks = []
                async for chunk in response.aiter_raw():
                    chunks.append(chunk)
                    release.set()
    assert chunks[0] == b"data: 1\n\n"
    assert b"".join(chunks) == b"data: 1\n\ndata: 2\n\n"
    assert response.headers["x-tier-model"] == "opus"
