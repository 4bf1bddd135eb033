"""What each example's chat endpoint does: call the provider with the official OpenAI SDK, the
way the README recommends.

- The SDK's HTTP client runs on `UpstreamTransport`, so the middleware learns what the provider
  itself answered (a 429 the endpoint turned into something else still counts against that
  model), and, when tiers.toml has a `[providers]` table, each call goes to the chosen provider's
  base URL with its key.
- `max_retries=0`: the middleware retries a failing call once on another model; the SDK's own
  retries would hit the same failing model again first.
- Provider errors go on to the client with their status and Retry-After.
"""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai

from tier_middleware import UpstreamTransport


@functools.cache
def llm(base_url: str) -> openai.AsyncOpenAI:
    """One SDK client per provider base URL, made on first use and kept."""
    return openai.AsyncOpenAI(
        api_key=os.environ.get("OPENAI_API_KEY", "sk-fake"),
        base_url=base_url,
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=UpstreamTransport()),
    )


async def ask(base_url: str, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
    """Send a chat request to the provider: (status, a JSON body or an async iterator of
    server-sent event lines, response headers)."""
    arguments: dict[str, Any] = {"model": body["model"], "messages": body["messages"]}
    if "stream_options" in body:
        arguments["stream_options"] = body["stream_options"]
    try:
        if body.get("stream"):
            stream = await llm(base_url).chat.completions.create(**arguments, stream=True)
            return 200, _events(stream), {"content-type": "text/event-stream"}
        completion = await llm(base_url).chat.completions.create(**arguments)
    except openai.APIStatusError as exc:  # the provider's own answer, passed on
        retry = {k: v for k, v in exc.response.headers.items() if k.startswith("retry-after")}
        return exc.status_code, {"error": exc.body}, retry
    return 200, completion.model_dump(exclude_unset=True), {}


async def _events(stream: Any) -> AsyncIterator[str]:
    async for chunk in stream:
        yield f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"
    yield "data: [DONE]\n\n"
