"""The control plane as a config source: `GET` its tier-config URL, with the credentials it asks
for, and turn every way that can fail into one `FetchError` whose text holds no secret.

`ControlPlaneSource` only describes and fetches; keeping the fetched config fresh is
`ConfigManager`'s job (`_config_manager.py`).
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import msgspec

from ._config import TierConfig
from ._errors import ConfigError, TierMiddlewareError

MAX_BODY_BYTES = 4 * 1024 * 1024  # a tier table is a few KB; anything this big is not one


class FetchError(TierMiddlewareError):
    """One failed fetch. `reason` is safe to log: it never holds the API key or header values."""

    def __init__(self, reason: str, kind: str, status_code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind  # auth | timeout | connection | status | too_large | not_json | invalid
        self.status_code = status_code


@dataclass(frozen=True, slots=True, repr=False)
class ControlPlaneSource:
    """`GET {url}` (the full URL of `/api/v1/tiers/config`) returns the tier config.

    `api_key_env` names an environment variable read at every fetch and sent as
    `Authorization: Bearer <value>`. `timeout` bounds the whole fetch (connect to last byte);
    `ttl` is how long a fetched config counts as fresh (refreshed ahead of that).
    """

    url: str
    headers: Mapping[str, str] | None = None
    api_key_env: str | None = None
    timeout: float = 2.0
    ttl: float = 1800.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"control plane URL must be an absolute http(s) URL, got {self.display_url!r}"
            )
        for name in ("timeout", "ttl"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.api_key_env is not None and not self.api_key_env:
            raise ValueError("api_key_env must name an environment variable")

    def __repr__(self) -> str:  # no credentials: not the URL's, not the headers
        return (
            f"ControlPlaneSource({self.display_url!r}, api_key_env={self.api_key_env!r}, "
            f"timeout={self.timeout!r}, ttl={self.ttl!r})"
        )

    @property
    def display_url(self) -> str:
        """The URL without credentials, query or fragment: safe for logs and metrics."""
        parts = urlsplit(self.url)
        host = parts.netloc.rpartition("@")[2]
        return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else "<invalid url>"

    async def fetch(self, client: httpx.AsyncClient) -> tuple[TierConfig, bytes]:
        """Fetch and validate the config; returns it with the raw body. Raises FetchError only."""
        headers = {"Accept": "application/json", **(self.headers or {})}
        secrets = [v for v in (self.headers or {}).values() if len(v) >= 4]
        for name, value in (self.headers or {}).items():
            # Checked before httpx can echo a bad value (a key read with its newline) in an error.
            if not (value.isascii() and value.isprintable()):
                raise FetchError(
                    f"control plane header {name!r} does not hold a valid header value "
                    "(printable ASCII)",
                    "auth",
                )
        if self.api_key_env is not None:
            key = os.environ.get(self.api_key_env, "").strip()
            if not key:
                raise FetchError(
                    f"environment variable {self.api_key_env} (api_key_env) is empty or not set",
                    "auth",
                )
            if not key.isascii() or not key.isprintable():
                raise FetchError(
                    f"environment variable {self.api_key_env} (api_key_env) does not hold a "
                    "valid header value",
                    "auth",
                )
            headers["Authorization"] = f"Bearer {key}"
            secrets.append(key)
        try:
            body = await self._get(client, headers)
        except FetchError:
            raise
        except (TimeoutError, httpx.TimeoutException):
            raise FetchError(f"no complete answer within {self.timeout:g}s", "timeout") from None
        except httpx.HTTPError as exc:
            detail = _redact(f"{type(exc).__name__}: {exc}", secrets)
            raise FetchError(detail[:300], "connection") from None
        except (ValueError, UnicodeError) as exc:  # the text may quote a header: leave it out
            raise FetchError(
                f"the request could not be sent ({type(exc).__name__})", "connection"
            ) from None
        try:
            data = msgspec.json.decode(body)
        except (ValueError, RecursionError) as exc:  # msgspec.DecodeError, UnicodeDecodeError
            raise FetchError(
                f"the response is not JSON ({_redact(str(exc), secrets)[:120]})", "not_json"
            ) from None
        try:
            config = TierConfig.from_data(data, source_name=self.display_url)
        except ConfigError as exc:
            raise FetchError(
                f"invalid config: {_redact(str(exc), secrets)[:500]}", "invalid"
            ) from None
        return config, body

    async def _get(self, client: httpx.AsyncClient, headers: dict[str, str]) -> bytes:
        async with (
            asyncio.timeout(self.timeout),
            client.stream("GET", self.url, headers=headers, timeout=self.timeout) as resp,
        ):
            if not 200 <= resp.status_code < 300:
                ctype = resp.headers.get("content-type", "").split(";")[0].strip() or "none"
                raise FetchError(
                    f"HTTP {resp.status_code} (content-type {ctype})",
                    "status",
                    resp.status_code,
                )
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise FetchError(
                        f"the response is larger than {MAX_BODY_BYTES} bytes", "too_large"
                    )
            return bytes(body)


def _redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


__all__ = ["ControlPlaneSource", "FetchError"]
