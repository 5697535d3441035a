"""The ``flexworker`` command line.

Every command turns our errors into one line on stderr and an exit status, never a
traceback: 2 for configuration problems, 1 for failures at run time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn

from worker import __version__
from worker.api.wire import parse_time
from worker.errors import ConfigError, FlexworkerError

if TYPE_CHECKING:
    from worker.sim import SimConfig

__all__ = ["build_parser", "main", "sim_config"]

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


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line too, like every other error (subcommands inherit this)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"flexworker: error: {self.prog}: {message} (see '{self.prog} --help')\n")


#: The simulator's side-activity settings: Activity field, what it makes happen.
_ACTIVITY_FLAGS = (
    ("message_share", "a party sends a message"),
    ("user_deletion_share", "a user deletes their account"),
    ("user_ban_share", "an operator bans a user"),
    ("listing_deletion_share", "an operator deletes a listing"),
    ("transaction_deletion_share", "a finished transaction is deleted"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    sim.add_argument(
        "--reviews",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="review transitions write reviews (default on)",
    )
    for name, what in _ACTIVITY_FLAGS:
        sim.add_argument(
            f"--{name.replace('_', '-')}",
            type=_fraction,
            default=None,
            help=f"odds per transition that {what}; 0 never (default: the lively preset)",
        )

    commands.add_parser(
        "check",
        help="check the settings and the credentials against the Integration API",
        description="Load the settings, authenticate, and show the marketplace.",
    )

    poll = commands.add_parser("poll", help="poll the Integration API and queue every transition")
    _source_options(poll)
    poll.add_argument("--once", action="store_true", help="run one complete cycle and exit")
    poll.add_argument(
        "--max-duration",
        type=_non_negative,
        metavar="S",
        help="with --once: stop at the first checkpoint after S seconds; the next run resumes there",
    )
    commands.add_parser("work", help="run the worker: hand queued events to the enabled handlers")
    run = commands.add_parser("run", help="run the poller and the worker in one process")
    _source_options(run)
    commands.add_parser("status", help="show cursors and their lag, queue depth, jobs and handler outcomes")
    commands.add_parser(
        "handlers",
        help="list installed handlers: where from, enabled or not, subscription, retry policy",
        description="List every installed handler; enabled ones are loaded, so their problems show.",
    )
    _dlq_commands(commands)
    skipped = commands.add_parser(
        "skipped",
        help="list or clear the items a source skipped (they could not become events)",
        description="Items the poller could not turn into events are skipped, never a stall, and kept here.",
    )
    skipped_actions = skipped.add_subparsers(dest="skipped_command", required=True, metavar="ACTION")
    skipped_actions.add_parser("list", help="list skipped items, oldest first")
    skipped_actions.add_parser("clear", help="forget the records (the status counter stays)")

    demo = commands.add_parser(
        "demo",
        help="run everything locally against the simulator and check delivery against ground truth",
        description=(
            "Start the simulator with live traffic, a private redis-server (unless REDIS_URL is set), the "
            "poller and the worker with the jsonl handler; at the end compare delivered with made."
        ),
    )
    demo.add_argument(
        "--duration", type=_non_negative, default=30.0, help="seconds of live traffic (default 30)"
    )
    demo.add_argument("--rate", type=_non_negative, default=20.0, help="transitions per second (default 20)")
    demo.add_argument("--source", choices=("transactions", "events"), default="transactions")
    demo.add_argument("--seed", type=int, default=1, help="seed of the simulated marketplace (default 1)")
    demo.add_argument(
        "--idle-interval-s", type=_non_negative, default=2.0, help="poll interval when caught up (default 2)"
    )

    cursor = commands.add_parser("cursor", help="inspect or rewind the poll cursors")
    cursor_commands = cursor.add_subparsers(dest="cursor_command", required=True, metavar="ACTION")
    cursor_commands.add_parser("show", help="show both sources' cursors")
    cursor_set = cursor_commands.add_parser("set", help="set a source's cursor")
    cursor_set.add_argument("--source", choices=("transactions", "events"), required=True)
    target = cursor_set.add_mutually_exclusive_group(required=True)
    target.add_argument("--at", type=_instant, help="transactions: the new watermark (ISO 8601)")
    target.add_argument("--sequence-id", type=int, help="events: the last sequence id handled")
    target.add_argument("--clear", action="store_true", help="forget the cursor (next start uses --since)")
    return parser


def _dlq_commands(commands: Any) -> None:
    dlq = commands.add_parser(
        "dlq",
        help="inspect, replay or purge dead-lettered deliveries",
        description="Deliveries that failed for good wait in the dead-letter queue for a person to decide.",
    )
    actions = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    dlq_list = actions.add_parser("list", help="list dead letters, oldest first")
    _dlq_filters(dlq_list)
    show = actions.add_parser("show", help="show one dead letter: attempts and every error")
    show.add_argument("id", help="the dead letter's id (from `dlq list`)")
    show.add_argument("--event", action="store_true", help="also print the event (it holds personal data)")
    for name, verb in (("replay", "re-enqueue as fresh jobs (attempts start again)"), ("purge", "delete")):
        action = actions.add_parser(name, help=f"{verb} and remove from the queue: IDs, or --all matching")
        action.add_argument("ids", nargs="*", metavar="ID", help="dead letter ids")
        action.add_argument("--all", action="store_true", help="every dead letter matching the filters")
        _dlq_filters(action)
        if name == "replay":
            action.add_argument(
                "--force", action="store_true", help="run even where the delivery is already marked done"
            )
            action.add_argument(
                "--forget-uncertain-steps",
                action="store_true",
                help="steps that started without a result run again (you checked: they did not happen)",
            )


def _dlq_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--handler", help="only this handler's")
    parser.add_argument("--transition", help="only these transitions (a glob, e.g. 'transition/*refund*')")
    parser.add_argument("--since", type=_instant, help="dead-lettered at or after (ISO 8601)")
    parser.add_argument("--until", type=_instant, help="dead-lettered at or before (ISO 8601)")


def _instant(text: str) -> datetime:
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    if at.tzinfo is None:
        # Read as UTC it may be hours off the operator's meaning: transitions lost or replayed.
        raise argparse.ArgumentTypeError(
            f"{text!r} has no UTC offset: add one, e.g. {text}Z or {text}+02:00"
        ) from None
    return parse_time(text)


def _source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source", choices=("transactions", "events"), help="where to read transitions (default: setting)"
    )
    parser.add_argument(
        "--since", type=_instant, help="start here (ISO 8601) when the source has no cursor (default: now)"
    )


def sim_config(args: argparse.Namespace) -> SimConfig:
    """The simulator configuration ``flexworker sim`` arguments describe."""
    from worker.api.ratelimit import PRESETS
    from worker.sim import LIVELY, Activity, FaultConfig, SimConfig

    activity = Activity(
        **{
            name: getattr(LIVELY, name) if getattr(args, name) is None else getattr(args, name)
            for name, _ in _ACTIVITY_FLAGS
        }
    )
    return SimConfig(
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
        reviews=args.reviews,
        activity=activity,
    )


async def _run_sim(args: argparse.Namespace) -> None:
    from worker.sim import run_simulator

    await run_simulator(sim_config(args), args.host, args.port)


async def _run_check() -> None:
    from worker.api.client import IntegrationClient
    from worker.ops.logs import setup_logging
    from worker.settings import load_settings

    settings = load_settings()
    setup_logging(settings.log_level)
    async with IntegrationClient.from_settings(settings) as client:
        marketplace = await client.marketplace_show()
    name = marketplace.attributes.name or "(unnamed)"
    print(f"ok: marketplace {name} ({marketplace.id}) at {settings.sharetribe_api_base_url}")


async def _run_demo(args: argparse.Namespace) -> int:
    import os

    from rich.console import Console

    from worker.demo import run_demo, summary
    from worker.ops.logs import setup_logging

    setup_logging("WARNING")
    console = Console()
    result = await run_demo(
        duration_s=args.duration,
        rate=args.rate,
        source=args.source,
        seed=args.seed,
        idle_interval_s=args.idle_interval_s,
        redis_url=os.environ.get("REDIS_URL"),
        console=console,
    )
    console.print(summary(result))
    return 0 if result.ok else EXIT_FAILURE


async def _until_signalled(body: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``body(stop)``; SIGINT/SIGTERM set ``stop`` so it can finish cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await body(stop)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def _run_service(args: argparse.Namespace) -> None:
    from worker.ops.logs import setup_logging
    from worker.registry import load_handlers
    from worker.service import run_poller, run_worker
    from worker.settings import load_settings

    settings = load_settings()
    setup_logging(settings.log_level)
    if args.command == "poll":
        await _poll(args, settings)
    elif args.command == "work":
        handlers = load_handlers(settings)
        await _until_signalled(lambda stop: run_worker(settings, stop, handlers=handlers))
    else:
        handlers = load_handlers(settings)

        async def both(stop: asyncio.Event) -> None:
            await asyncio.gather(
                run_poller(settings, stop, source=args.source, since=args.since),
                run_worker(settings, stop, handlers=handlers),
            )

        await _until_signalled(both)


async def _poll(args: argparse.Namespace, settings: Any) -> None:
    from rich.console import Console

    from worker.ops.progress import progress_bar, summary_line
    from worker.poll.sources import CycleReport
    from worker.service import run_poller

    if args.max_duration is not None and not args.once:
        raise ConfigError("poll --max-duration needs --once")
    reports: list[CycleReport | None] = []
    console = Console(stderr=True)
    with contextlib.ExitStack() as stack:
        watcher = stack.enter_context(progress_bar(console)) if args.once and console.is_terminal else None

        async def body(stop: asyncio.Event) -> None:
            reports.append(
                await run_poller(
                    settings,
                    stop,
                    once=args.once,
                    source=args.source,
                    since=args.since,
                    max_duration_s=args.max_duration,
                    watcher=watcher,
                )
            )

        await _until_signalled(body)
    if reports and reports[0] is not None:
        print(summary_line(args.source or settings.source, reports[0]))


async def _run_inspect(args: argparse.Namespace) -> None:
    from worker.events import from_ms, to_ms
    from worker.ops.logs import setup_logging
    from worker.ops.status import read_status
    from worker.poll.cursor import CursorStore
    from worker.service import open_redis
    from worker.settings import load_settings

    settings = load_settings()
    # One-off commands print their answer; library chatter (arq's connection retries) stays out.
    setup_logging("ERROR")
    async with open_redis(settings) as redis_pool:
        if args.command == "status":
            print("\n".join((await read_status(settings, redis_pool)).lines()))
            return
        if args.command == "skipped":
            await _skipped(args, settings, redis_pool)
            return
        cursors = CursorStore(redis_pool, settings.redis_prefix)
        if args.cursor_command == "set":
            if args.clear:
                await cursors.delete(args.source)
            elif args.source == "transactions":
                if args.at is None:
                    raise ConfigError("cursor set --source transactions needs --at")
                await cursors.set("transactions", to_ms(args.at))
            else:
                if args.sequence_id is None:
                    raise ConfigError("cursor set --source events needs --sequence-id")
                await cursors.set("events", args.sequence_id)
        watermark = await cursors.get("transactions")
        sequence_id = await cursors.get("events")
        print(f"transactions: {'none' if watermark is None else from_ms(watermark).isoformat()}")
        print(f"events:       {'none' if sequence_id is None else sequence_id}")


async def _skipped(args: argparse.Namespace, settings: Any, redis_pool: Any) -> None:
    from worker.poll.skipped import SkippedItems

    items = SkippedItems(
        redis_pool, settings.redis_prefix, retention_s=settings.seen_retention_s, clock=lambda: 0
    )
    if args.skipped_command == "clear":
        print(f"cleared {await items.clear()} skipped item records")
        return
    found = await items.list()
    for item in found:
        print(
            f"{item.last_seen.isoformat(timespec='seconds')}  {item.source}  {item.resource_type} "
            f"{item.resource_id}  seen {item.times}x  {item.reason}"
        )
    print(f"{len(found)} skipped item{'' if len(found) == 1 else 's'}")


async def _run_handlers() -> None:
    from worker.registry import describe_handlers
    from worker.settings import load_settings

    settings = load_settings()
    infos = describe_handlers(settings)
    if not infos:
        print("no handlers installed")
        return
    for info in infos:
        state = "enabled" if info.enabled else "disabled"
        print(f"{info.name} ({state}) from {info.distribution}: {info.target}")
        print(f"  subscription: {info.subscription}")
        print(f"  retry:        {info.retry}")
        if info.problem:
            print(f"  problem:      {info.problem}")
    broken = [info for info in infos if info.enabled and info.problem]
    if broken:
        raise ConfigError(broken[0].problem or "")


def _dlq_line(letter: Any) -> str:
    last = letter.last_error
    error = f"{last.type}" if last else "-"
    return (
        f"{letter.id}  {letter.dead_lettered_at.isoformat(timespec='seconds')}  {letter.handler}  "
        f"{letter.transition}  attempts={letter.attempts}  {letter.reason}  {error}  {letter.event_key}"
    )


async def _run_dlq(args: argparse.Namespace) -> None:
    import json

    from worker.deliver.dlq import DeadLetters, DlqFilter
    from worker.ops.logs import setup_logging
    from worker.service import open_redis
    from worker.settings import load_settings

    settings = load_settings()
    setup_logging("ERROR")
    filters = DlqFilter(
        handler=getattr(args, "handler", None),
        transition=getattr(args, "transition", None),
        since=getattr(args, "since", None),
        until=getattr(args, "until", None),
    )
    async with open_redis(settings) as redis_pool:
        dead_letters = DeadLetters(redis_pool, settings)
        if args.dlq_command == "list":
            letters = await dead_letters.list(filters)
            for letter in letters:
                print(_dlq_line(letter))
            print(f"{len(letters)} dead letter{'' if len(letters) == 1 else 's'}")
            return
        if args.dlq_command == "show":
            found = await dead_letters.show(args.id)
            if found is None:
                raise ConfigError(f"no dead letter with id {args.id!r} (see `flexworker dlq list`)")
            letter = found
            print(f"id:               {letter.id}")
            print(f"handler:          {letter.handler}")
            print(f"event:            {letter.event_key}")
            print(f"transition:       {letter.transition} ({letter.process_name})")
            print(f"reason:           {letter.reason} after {letter.attempts} attempt(s)")
            print(f"first failure:    {letter.first_failure_at.isoformat()}")
            print(f"dead-lettered at: {letter.dead_lettered_at.isoformat()}")
            print("errors:")
            for error in letter.errors:
                where = f" [{error.where}]" if error.where else ""
                print(
                    f"  {error.at.isoformat()} attempt {error.attempt}: {error.type}: {error.message}{where}"
                )
            if args.event:
                print(json.dumps(letter.event, indent=2, sort_keys=True))
            return
        has_filters = any(
            v is not None for v in (filters.handler, filters.transition, filters.since, filters.until)
        )
        if args.ids and (args.all or has_filters):
            raise ConfigError(f"dlq {args.dlq_command}: give dead letter ids or --all with filters, not both")
        if not args.ids and not args.all:
            raise ConfigError(
                f"dlq {args.dlq_command}: give dead letter ids, or --all (with filters) for many"
            )
        letters = await (dead_letters.select(args.ids) if args.ids else dead_letters.list(filters))
        if args.dlq_command == "replay":
            job_ids = await dead_letters.replay(
                letters, force=args.force, forget_uncertain=args.forget_uncertain_steps
            )
            print(f"replayed {len(job_ids)} dead letter{'' if len(job_ids) == 1 else 's'}")
        else:
            removed = await dead_letters.purge(letters)
            print(f"purged {removed} dead letter{'' if removed == 1 else 's'}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "sim":
            asyncio.run(_run_sim(args))
        elif args.command == "check":
            asyncio.run(_run_check())
        elif args.command in ("poll", "work", "run"):
            asyncio.run(_run_service(args))
        elif args.command in ("status", "cursor", "skipped"):
            asyncio.run(_run_inspect(args))
        elif args.command == "handlers":
            asyncio.run(_run_handlers())
        elif args.command == "dlq":
            asyncio.run(_run_dlq(args))
        elif args.command == "demo":
            return asyncio.run(_run_demo(args))
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
