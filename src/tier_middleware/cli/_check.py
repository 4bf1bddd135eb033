"""`tier-middleware check`: load a tier config from a file or a control plane, and show it."""

from __future__ import annotations

import argparse
import asyncio
from typing import TextIO

import httpx

from .._config import ConfigError, TierConfig
from .._control_plane import ControlPlaneSource, FetchError
from .._router import TierRouter
from ._tables import column_widths, format_price, format_table


def is_url(target: str) -> bool:
    return target.lower().startswith(("http://", "https://"))


async def _fetch(source: ControlPlaneSource) -> TierConfig:
    async with httpx.AsyncClient(timeout=source.timeout, follow_redirects=False) as client:
        config, _ = await source.fetch(client)
    return config


def _load(args: argparse.Namespace, err: TextIO) -> tuple[TierConfig, str] | None:
    """The config named on the command line and where it came from; None after reporting why
    it could not be had."""
    target: str = args.config
    if not is_url(target):
        try:
            return TierConfig.load(target), target
        except ConfigError as exc:
            print(f"error: {exc}", file=err)
            return None
    try:
        source = ControlPlaneSource(target, api_key_env=args.api_key_env, timeout=args.timeout)
    except ValueError as exc:
        print(f"error: {exc}", file=err)
        return None
    try:
        config = asyncio.run(_fetch(source))
    except FetchError as exc:
        where = source.display_url
        if exc.kind in ("connection", "timeout"):
            message = f"cannot reach the control plane at {where}: {exc.reason}"
        elif exc.kind == "invalid":
            message = exc.reason.removeprefix("invalid config: ")
        elif exc.kind == "auth":
            message = f"cannot authenticate to {where}: {exc.reason}"
        else:
            message = f"the control plane at {where} did not return a tier config: {exc.reason}"
        print(f"error: {message}", file=err)
        return None
    return config, source.display_url


def render_config(config: TierConfig, source: str) -> list[str]:
    """The `check` report: the version, then per tier each model with its chance of selection."""
    router = TierRouter(config)
    count = sum(len(config.models(tier)) for tier in config.tier_order)
    lines = [
        f"config   {source}",
        f"version  {config.version}",
    ]
    if config.updated_at:
        lines.append(f"updated  {config.updated_at}")
    lines.append(f"tiers    {', '.join(config.tier_order)} ({count} models)")
    tables: list[list[list[str]]] = []
    for tier in config.tier_order:
        chances = router.probabilities(tier)
        rows = [
            [
                m.provider,
                m.model,
                str(m.relative_cost),
                f"{chances[m.key] * 100:.1f}%",
                format_price(m.input_price_per_million),
                format_price(m.output_price_per_million),
            ]
            for m in config.models(tier)
        ]
        tables.append(rows)
    header = ["provider", "model", "rel cost", "probability", "in $/M", "out $/M"]
    widths = column_widths(header, *tables)
    for tier, rows in zip(config.tier_order, tables, strict=True):
        lines += ["", tier, *format_table(header, rows, left=2, widths=widths)]
    if config.providers:  # where UpstreamTransport sends each provider's calls (no key shown)
        rows = [
            [name, p.base_url, p.api_key_env or "(none)", p.auth_header]
            for name, p in sorted(config.providers.items())
        ]
        lines += [
            "",
            "providers",
            *format_table(["provider", "base_url", "key from", "header"], rows, left=4),
        ]
    return lines


def check(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    loaded = _load(args, err)
    if loaded is None:
        return 1
    print("\n".join(render_config(*loaded)), file=out)
    return 0


__all__ = ["check", "is_url", "render_config"]
