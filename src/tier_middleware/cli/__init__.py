"""The `tier-middleware` command: `check` a tier config, or watch the middleware in a `demo`.

    tier-middleware check tiers.toml              # a file (.toml or .json)
    tier-middleware check https://cp.example/api/v1/tiers/config --api-key-env CP_KEY
    tier-middleware demo [--requests 300] [--seed 7]

Exit status: 0 on success, 1 when the config is invalid or cannot be fetched, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import TextIO

from .._version import __version__
from ._check import check, is_url
from ._tables import format_table

PROG = "tier-middleware"
DEFAULT_TIMEOUT = 5.0


# -- demo ------------------------------------------------------------------------------------------


def _run_demo(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
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
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check_command = commands.add_parser(
        "check",
        help="validate a tier config and show each model's chance of selection",
        description=(
            "Load a tier config from a .toml or .json file, or fetch it once from a control plane "
            "URL, validate it and print every tier's models with their relative cost, the "
            "probability of being selected and their prices. Exits 1 when the config is invalid "
            "or cannot be fetched."
        ),
    )
    check_command.add_argument(
        "config", metavar="CONFIG", help="a .toml or .json file, or an http(s) control plane URL"
    )
    check_command.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"for a URL: give up after this long (default {DEFAULT_TIMEOUT:g})",
    )
    check_command.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="for a URL: send the value of this environment variable as a Bearer token",
    )
    check_command.set_defaults(handler=check)

    demo_command = commands.add_parser(
        "demo",
        help="simulate traffic through the middleware, offline, with a provider outage",
        description=(
            "Send simulated chat requests through TierRoutingMiddleware in front of fake "
            "providers, in memory and in simulated time. One provider goes down midway and comes "
            "back; the summary shows how the traffic was routed, retried and priced, and how the "
            "failing models were backed off and let back in."
        ),
    )
    demo_command.add_argument(
        "--requests",
        type=_positive_int,
        default=300,
        metavar="N",
        help="how many requests to send (default 300)",
    )
    demo_command.add_argument(
        "--seed", type=int, default=7, help="seed of the traffic and routing draws (default 7)"
    )
    demo_command.set_defaults(handler=_run_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "check" and args.api_key_env is not None and not is_url(args.config):
        parser.error("--api-key-env applies to a control plane URL only")
    try:
        status: int = args.handler(args, sys.stdout, sys.stderr)
    except KeyboardInterrupt:
        return 130
    return status


__all__ = ["build_parser", "format_table", "main"]
