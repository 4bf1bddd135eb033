"""UpstreamTransport: the provider call reports its own outcome, and goes to the chosen provider.

Give it to the HTTP client of the SDK the app calls the provider with::

    AsyncOpenAI(http_client=httpx2.AsyncClient(transport=UpstreamTransport()), max_retries=0)

Inside a routed request, every call through it tells that request's attempt what the provider
said (its status and Retry-After, or the timeout or connection error), so the middleware judges
the model by the provider's answer, not by what the app made of it. When the tier config
describes the chosen provider (`providers`), the call goes to that provider's `base_url` with its
key. Outside a routed request it only passes the call on.

It works with httpx2 (what the openai and anthropic SDKs use) and httpx clients alike, by duck
typing: neither is imported here, so the package imports without httpx2 installed.
"""

from __future__ import annotations

import logging
import os
import sys
from types import ModuleType, TracebackType
from typing import Any

from ._attempt import Attempt, current_attempt
from ._attribution import Verdict, parse_retry_after
from ._config import ProviderConfig
from ._errors import provider_misconfigured
from ._payload import TooDeep, parse_object

logger = logging.getLogger("tier_middleware")

# The SDK's own credentials never go to another provider.
_CREDENTIALS = frozenset({b"authorization", b"x-api-key", b"api-key"})
_REPLACED = _CREDENTIALS | {b"host"}
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})


class _Misconfigured(Exception):
    """The call cannot go to the chosen provider (no key, a path outside `base_path`)."""


class UpstreamTransport:
    """An async HTTP transport for httpx2 and httpx clients that reports each provider call to
    the routed request it belongs to, and dispatches it to the chosen provider.

    `inner` is the transport that sends the calls (default: the client library's plain
    `AsyncHTTPTransport`, made on first use). `base_path` is the part of the SDK's base URL that a
    provider's `base_url` replaces: with the OpenAI SDK's default `.../v1`,
    `http://placeholder/v1/chat/completions` goes to `<base_url>/chat/completions`.
    """

    def __init__(self, inner: Any = None, *, base_path: str = "/v1") -> None:
        base_path = base_path.rstrip("/")
        if base_path and not base_path.startswith("/"):
            raise ValueError(f"base_path must start with '/', got {base_path!r}")
        self.inner = inner
        self.base_path = base_path
        self._plain: dict[str, Any] = {}  # client library -> its default transport
        self._warned: set[tuple[str, str]] = set()

    async def handle_async_request(self, request: Any) -> Any:
        attempt = current_attempt.get()
        inner = self.inner if self.inner is not None else self._plain_for(request)
        if attempt is None:
            return await inner.handle_async_request(request)  # not a routed request: untouched
        mw = attempt.exchange.mw
        config = mw.config
        provider = config.providers.get(attempt.selection.provider) if config else None
        if provider is not None:
            try:
                request = self._dispatched(request, provider, attempt.selection.model)
            except _Misconfigured as exc:
                return self._refuse(attempt, request, str(exc))
        try:
            response = await inner.handle_async_request(request)
        except Exception:  # a timeout, a refused connection, an answer that is no HTTP
            attempt.report(Verdict.MODEL_FAILURE)
            raise
        status = response.status_code
        if status < 400:
            attempt.report(Verdict.SUCCESS)
            response.stream = _watched(_library(request), response.stream, attempt)
        elif status >= 500 or status in mw.failure_statuses:
            headers = response.headers
            attempt.report(
                Verdict.MODEL_FAILURE,
                parse_retry_after(headers.get("retry-after-ms"), headers.get("retry-after")),
            )
        else:
            attempt.report(Verdict.CALLER_ERROR)
        return response

    # -- dispatch -----------------------------------------------------------------------------

    def _dispatched(self, request: Any, provider: ProviderConfig, model: str) -> Any:
        """The request, sent to `provider` with its key and the chosen `model`."""
        url = request.url
        path: str = url.path
        base = self.base_path
        if base and path != base and not path.startswith(base + "/"):
            raise _Misconfigured(f"the request path {path!r} is outside base_path {base!r}")
        target = provider.base_url + path[len(base) :]
        if url.query:
            target += "?" + url.query.decode("ascii")
        headers = [(k, v) for k, v in request.headers.raw if k.lower() not in _REPLACED]
        if provider.api_key_env is not None:
            key = os.environ.get(provider.api_key_env)  # read now: a rotated key is used at once
            if not key:
                raise _Misconfigured(f"environment variable {provider.api_key_env} is not set")
            name, prefix = provider.header
            headers.append((name.encode("latin-1"), f"{prefix}{key}".encode("latin-1")))
        library = _library(request)
        content = _with_model(request, model)
        if content is None:  # the body goes as it is (streamed, if it is)
            headers.append((b"host", library.URL(target).netloc))
            return library.Request(
                request.method,
                target,
                headers=headers,
                stream=request.stream,
                extensions=request.extensions,
            )
        headers = [(k, v) for k, v in headers if k.lower() not in _FRAMING]
        return library.Request(
            request.method, target, headers=headers, content=content, extensions=request.extensions
        )

    def _refuse(self, attempt: Attempt, request: Any, reason: str) -> Any:
        """No call goes out: the attempt learns why (the middleware answers 503
        `provider_misconfigured`), and the SDK gets a 503 it does not retry."""
        attempt.misconfigured = reason
        provider = attempt.selection.provider
        if (provider, reason) not in self._warned:
            self._warned.add((provider, reason))
            logger.warning(
                "provider call not dispatched", extra={"provider": provider, "reason": reason}
            )
        error = provider_misconfigured(provider, attempt.exchange.mw.retry_after_bounds)
        return _library(request).Response(
            503,
            headers={"content-type": "application/json", "x-should-retry": "false"},
            content=error.body(),
            request=request,
        )

    # -- the client's side ----------------------------------------------------------------------

    def _plain_for(self, request: Any) -> Any:
        name = type(request).__module__.partition(".")[0]
        transport = self._plain.get(name)
        if transport is None:
            transport = self._plain[name] = sys.modules[name].AsyncHTTPTransport()
        return transport

    async def aclose(self) -> None:
        transports = [self.inner] if self.inner is not None else list(self._plain.values())
        self._plain.clear()
        for transport in transports:
            await transport.aclose()

    async def __aenter__(self) -> UpstreamTransport:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.aclose()


def _library(request: Any) -> ModuleType:
    """httpx2 or httpx: the library of the client that sent `request`."""
    return sys.modules[type(request).__module__.partition(".")[0]]


def _with_model(request: Any, model: str) -> bytes | None:
    """The JSON body with `model` set to the chosen one, or None when it is already (or the
    body is not a JSON object the transport can read)."""
    content_type = request.headers.get("content-type", "")
    if "json" not in content_type:
        return None
    try:
        body = request.content
    except Exception:  # a streamed body that was not read: it goes as it is
        return None
    payload = parse_object(body) if body else None
    if payload is None or payload.value("model") == model:
        return None
    try:
        return payload.rewrite("model", "model", model)
    except TooDeep:
        return None


_watchers: dict[str, type] = {}


def _watched(library: ModuleType, stream: Any, attempt: Attempt) -> Any:
    """`stream`, passed through chunk by chunk (never buffered); if it breaks while the app
    reads it, the attempt is told it failed."""
    cls = _watchers.get(library.__name__)
    if cls is None:

        class Watched(library.AsyncByteStream):  # type: ignore[name-defined,misc]
            def __init__(self, stream: Any, attempt: Attempt) -> None:
                self.stream = stream
                self.attempt = attempt

            async def __aiter__(self) -> Any:
                try:
                    async for chunk in self.stream:
                        yield chunk
                except Exception:
                    self.attempt.report(Verdict.MODEL_FAILURE)
                    raise

            async def aclose(self) -> None:
                await self.stream.aclose()

        cls = _watchers[library.__name__] = Watched
    return cls(stream, attempt)
