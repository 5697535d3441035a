"""The ``flexworker`` command line.

Every command turns our errors into one line on stderr and an exit status, never a
traceback: 2 for configuration problems, 1 for failures at run time.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from worker import __version__
from worker.errors import ConfigError, FlexworkerError

__all__ = ["build_parser", "main"]

EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexworker",
        description="Keep a Sharetribe marketplace's back office in step with its transactions.",
    )
    parser.add_argument("--version", action="version", version=f"flexworker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = commands.add_parser(
        "sim",
        help="serve a local Integration API simulator with live traffic",
        description="Serve a local Sharetribe Integration API simulator on localhost.",
    )
    sim.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    sim.add_argument("--port", type=int, default=8788, help="port to bind (default 8788; 0 picks a free one)")
    sim.add_argument("--seed", type=int, default=1, help="seed of ids and traffic (default 1)")
    sim.add_argument(
        "--rate", type=_non_negative, default=0.0, help="transitions per second of live traffic (default 0)"
    )
    sim.add_argument(
        "--rate-limit",
        choices=("dev", "off"),
        default="dev",
        help="answer 429 like a dev marketplace (default dev)",
    )
    sim.add_argument(
        "--token-lifetime-s", type=_non_negative, default=600.0, help="access token lifetime (default 600)"
    )
    sim.add_argument("--page-cap", type=int, default=10_000, help="items reachable by paging (default 10000)")
    sim.add_argument("--error-rate", type=_fraction, default=0.0, help="share of 500/502/503 answers")
    sim.add_argument("--drop-rate", type=_fraction, default=0.0, help="share of dropped connections")
    sim.add_argument("--truncated-rate", type=_fraction, default=0.0, help="share of truncated bodies")
    sim.add_argument("--malformed-rate", type=_fraction, default=0.0, help="share of malformed JSON bodies")
    sim.add_argument("--latency-s", type=_non_negative, default=0.0, help="latency added to each answer")

    commands.add_parser(
        "check",
        help="check the settings and the credentials against the Integration API",
        description="Load the settings, authenticate, and show the marketplace.",
    )
    return parser


async def _run_sim(args: argparse.Namespace) -> None:
    from worker.ratelimit import PRESETS
    from worker.sim import FaultConfig, SimConfig, run_simulator

    config = SimConfig(
        seed=args.seed,
        traffic_rate=args.rate,
        rate_limits=PRESETS["dev"] if args.rate_limit == "dev" else None,
        token_lifetime_s=args.token_lifetime_s,
        page_cap=args.page_cap,
        faults=FaultConfig(
            error_rate=args.error_rate,
            drop_rate=args.drop_rate,
            truncated_rate=args.truncated_rate,
            malformed_rate=args.malformed_rate,
            latency_s=args.latency_s,
        ),
    )
    await run_simulator(config, args.host, args.port)


async def _run_check() -> None:
    from worker.client import IntegrationClient
    from worker.settings import load_settings

    settings = load_settings()
    async with IntegrationClient.from_settings(settings) as client:
        marketplace = await client.marketplace_show()
    name = marketplace.attributes.name or "(unnamed)"
    print(f"ok: marketplace {name} ({marketplace.id}) at {settings.sharetribe_api_base_url}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "sim":
            asyncio.run(_run_sim(args))
        elif args.command == "check":
            asyncio.run(_run_check())
    except ConfigError as exc:
        print(f"flexworker: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except FlexworkerError as exc:
        print(f"flexworker: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
