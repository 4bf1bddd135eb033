"""The `tier-middleware` command: `check` a tier config, or watch the middleware in a `demo`.

    tier-middleware check tiers.toml              # a file (.toml or .json)
    tier-middleware check https://cp.example/api/v1/tiers/config --api-key-env CP_KEY
    tier-middleware demo [--requests 300] [--seed 7]

Exit status: 0 on success, 1 when the config is invalid or cannot be fetched, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import TextIO

import httpx

from ._config import ConfigError, TierConfig
from ._control_plane import ControlPlaneSource, FetchError
from ._router import TierRouter

PROG = "tier-middleware"
DEFAULT_TIMEOUT = 5.0


def _package_version() -> str:
    try:
        return version("tier-middleware")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


# -- tables ------------------------------------------------------------------------------------


def format_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    left: int = 1,
    indent: str = "  ",
    widths: Sequence[int] | None = None,
) -> list[str]:
    """Aligned columns two spaces apart: the first `left` left-aligned, the others right-aligned.

    `widths` (from `column_widths`) lines up several tables; by default each column is as wide
    as its widest cell."""
    if widths is None:
        widths = column_widths(header, rows)

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(width) if i < left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return (indent + "  ".join(parts)).rstrip()

    return [line(header), *(line(row) for row in rows)]


def column_widths(header: Sequence[str], *tables: Sequence[Sequence[str]]) -> list[int]:
    """The width of each column over the header and the rows of all `tables`."""
    rows = [header, *(row for table in tables for row in table)]
    return [max(len(row[i]) for row in rows) for i in range(len(header))]


def format_price(value: float) -> str:
    """A price per million tokens: at least two decimals, up to four when they matter."""
    text = f"{value:.4f}".rstrip("0")
    whole, _, decimals = text.partition(".")
    return f"{whole}.{decimals.ljust(2, '0')}"


# -- check ---------------------------------------------------------------------------------------


def _is_url(target: str) -> bool:
    return target.lower().startswith(("http://", "https://"))


async def _fetch(source: ControlPlaneSource) -> TierConfig:
    async with httpx.AsyncClient(timeout=source.timeout, follow_redirects=False) as client:
        config, _ = await source.fetch(client)
    return config


def _load(args: argparse.Namespace, err: TextIO) -> tuple[TierConfig, str] | None:
    """The config named on the command line and where it came from; None after reporting why
    it could not be had."""
    target: str = args.config
    if not _is_url(target):
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


def _check(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    loaded = _load(args, err)
    if loaded is None:
        return 1
    print("\n".join(render_config(*loaded)), file=out)
    return 0


# -- demo ------------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ._demo import run_demo  # the simulation pulls in more than `check` needs

    return run_demo(seed=args.seed, requests=args.requests, out=out)


# -- arguments -------------------------------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Route LLM calls by complexity tier: check a tier config, or run a demo.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser(
        "check",
        help="validate a tier config and show each model's chance of selection",
        description=(
            "Load a tier config from a .toml or .json file, or fetch it once from a control plane "
            "URL, validate it and print every tier's models with their relative cost, the "
            "probability of being selected and their prices. Exits 1 when the config is invalid "
            "or cannot be fetched."
        ),
    )
    check.add_argument(
        "config", metavar="CONFIG", help="a .toml or .json file, or an http(s) control plane URL"
    )
    check.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"for a URL: give up after this long (default {DEFAULT_TIMEOUT:g})",
    )
    check.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="for a URL: send the value of this environment variable as a Bearer token",
    )
    check.set_defaults(handler=_check)

    demo = commands.add_parser(
        "demo",
        help="simulate traffic through the middleware, offline, with a provider outage",
        description=(
            "Send simulated chat requests through TierRoutingMiddleware in front of fake "
            "providers, in memory and in simulated time. One provider goes down midway and comes "
            "back; the summary shows how the traffic was routed, retried and priced, and how the "
            "failing models were backed off and let back in."
        ),
    )
    demo.add_argument(
        "--requests",
        type=_positive_int,
        default=300,
        metavar="N",
        help="how many requests to send (default 300)",
    )
    demo.add_argument(
        "--seed", type=int, default=7, help="seed of the traffic and routing draws (default 7)"
    )
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "check" and args.api_key_env is not None and not _is_url(args.config):
        parser.error("--api-key-env applies to a control plane URL only")
    try:
        status: int = args.handler(args, sys.stdout, sys.stderr)
    except KeyboardInterrupt:
        return 130
    return status


__all__ = ["build_parser", "format_table", "main"]
