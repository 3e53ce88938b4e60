"""The service's command line: run, healthcheck, emit, types, demo, config, asyncapi, and the
operator commands (tail, dlq, replay: one module each under operator/)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any, NoReturn

from google.protobuf import json_format

from .. import SERVICE_NAME, TEMPLATE_VERSION
from .app import (
    build_loop,
    claim_check_from_settings,
    event_registry,
    run_until_signalled,
    tune_garbage_collection,
)
from .brokers import open_broker
from .brokers.base import BrokerUnavailable, Unpublishable, event_message
from .config import ENV_PREFIX, Settings, load_settings, reference, unknown_variables
from .envelope import CloudEventsProtobufCodec, Envelope, new_event_id, now
from .errors import CommandFailed, ConfigError
from .health import Heartbeat, check
from .logs import configure_logging, get_logger
from .operator import dlq, events, replay, tail
from .telemetry import configure_telemetry, shutdown_telemetry

# Operator commands: each module registers its arguments and runs it (async).
OPERATOR_COMMANDS = {"tail": tail, "dlq": dlq, "replay": replay, "events": events}


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line (`<prog>: error: ...`) and exit 2, not the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")


def _versions() -> str:
    """The service's own version and the template release it is on (fleet queries)."""
    return f"{version(SERVICE_NAME)} (template {TEMPLATE_VERSION})"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=SERVICE_NAME,
        description=f"Settings come from {ENV_PREFIX}* environment variables.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_versions()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("run", help="consume and handle events until SIGTERM")
    health = commands.add_parser("healthcheck", help="exit 0 if the loop is healthy, else 1")
    health.add_argument(
        "--live", action="store_true", help="liveness only: ignore readiness (bus/store outage)"
    )
    emit = commands.add_parser("emit", help="publish one event built from JSON")
    emit.add_argument("type", help="event type, e.g. one listed by `types`")
    emit.add_argument("data", nargs="?", default="-", help="JSON payload, or - for stdin")
    emit.add_argument("--key", default="", help="ordering key / CloudEvents subject")
    emit.add_argument("--id", dest="event_id", default=None, help="event id (default: new uuid)")
    commands.add_parser(
        "archive",
        help="run as the platform's archiver: every event on the bus into Parquet files "
        "in ARCHIVE_URL (ack after the file is stored)",
    )
    commands.add_parser("types", help="list the event types this service knows")
    commands.add_parser("demo", help="run the loop over a scripted stream on the memory bus")
    config = commands.add_parser(
        "config", help="print every environment variable with its default (dotenv format)"
    )
    config.add_argument(
        "--check",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="instead: name each variable with this service's prefix in these files or "
        "folders that is not a setting (left by a renamed or removed one); exit 1 if any",
    )
    asyncapi = commands.add_parser(
        "asyncapi", help="write the AsyncAPI 3.0 document of the events consumed and produced"
    )
    asyncapi.add_argument(
        "--output", type=Path, default=None, help="write it to this file (default: stdout)"
    )
    for command in OPERATOR_COMMANDS.values():
        command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "types":
            print("\n".join(event_registry().names()))
            return 0
        if args.command == "config" and args.check:
            return _check_config_files(args.check)
        if args.command == "config":
            for variable, default, description in reference():
                print(f"# {description}" if description else "#")
                print(f"{variable}={default}")
            return 0
        settings = load_settings()
        if args.command == "healthcheck":
            return _healthcheck(settings, live_only=args.live)
        if args.command == "emit":
            return asyncio.run(_emit(settings, args.type, args.data, args.key, args.event_id))
        if args.command == "demo":
            return _demo(settings)
        if args.command == "asyncapi":
            return _asyncapi(settings, args.output)
        if args.command == "archive":
            return _archive(settings)
        if (operator_command := OPERATOR_COMMANDS.get(args.command)) is not None:
            return _operate(settings, operator_command.run, args)
        return _run(settings)
    except (ConfigError, CommandFailed) as error:
        one_line = " ".join(str(error).split())
        print(f"{SERVICE_NAME}: error: {one_line}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    except KeyboardInterrupt:
        return 130


def _operate(
    settings: Settings,
    command: Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]],
    args: argparse.Namespace,
) -> int:
    # Library logs (aiokafka, aio-pika) on stderr, warnings only: stdout is the data.
    configure_logging(settings.model_copy(update={"log_level": "WARNING"}), sys.stderr)
    return asyncio.run(command(settings, args))


def _run(settings: Settings) -> int:
    from ..handlers import router

    configure_logging(settings)
    get_logger().info("starting", version=version(SERVICE_NAME), template_version=TEMPLATE_VERSION)
    configure_telemetry()
    loop = build_loop(
        settings,
        router,
        heartbeat=Heartbeat(settings.heartbeat_file),
        claim_check=claim_check_from_settings(),
    )
    tune_garbage_collection()
    try:
        asyncio.run(run_until_signalled(loop))
    finally:
        shutdown_telemetry()
    return 0


def _archive(settings: Settings) -> int:
    from .archive.sink import build_archiver, load_archive_settings
    from .objectstore import check, load_object_store_settings, open_object_store

    archive = load_archive_settings()
    store = open_object_store(load_object_store_settings())
    configure_logging(settings)
    get_logger().info("archiving", version=version(SERVICE_NAME), archive_url=store.url)
    configure_telemetry()
    loop = build_archiver(settings, archive, store, heartbeat=Heartbeat(settings.heartbeat_file))

    async def check_then_run() -> None:
        await check(store)  # a wrong bucket or credentials: one line, before consuming
        await run_until_signalled(loop)

    tune_garbage_collection()
    try:
        asyncio.run(check_then_run())
    finally:
        shutdown_telemetry()
    return 0


def _check_config_files(paths: list[Path]) -> int:
    unknown = unknown_variables(paths)
    for path, line, variable in unknown:
        print(f"{path}:{line}: {variable} is not a setting of this service (renamed or removed?)")
    if unknown:
        print(
            f"{len(unknown)} unknown; the template's CHANGELOG.md names each renamed setting",
            file=sys.stderr,
        )
        return 1
    return 0


def _healthcheck(settings: Settings, *, live_only: bool) -> int:
    problem = check(
        settings.heartbeat_file, settings.heartbeat_max_age_s, require_ready=not live_only
    )
    if problem is None:
        print("ok")
        return 0
    print(f"unhealthy: {problem}", file=sys.stderr)
    return 1


async def _emit(
    settings: Settings, type_name: str, data: str, key: str, event_id: str | None
) -> int:
    registry = event_registry()
    message_type = registry.get(type_name)
    if message_type is None:
        raise ConfigError(f"unknown event type {type_name!r}; known: {', '.join(registry.names())}")
    text = sys.stdin.read() if data == "-" else data
    try:
        payload = json_format.Parse(text or "{}", message_type())
    except json_format.ParseError as error:
        raise ConfigError(f"payload is not a valid {type_name}: {error}") from None
    envelope = Envelope(
        id=event_id or new_event_id(),
        type=type_name,
        source=settings.event_source,
        payload=payload,
        subject=key,
        time=now(),
    )
    topic = settings.topic_for(type_name)
    message = event_message(CloudEventsProtobufCodec(registry), envelope, topic)
    broker = open_broker(settings)
    try:
        await broker.start([])
        unrouted = await broker.publish([message])
    except BrokerUnavailable as error:
        raise CommandFailed(f"not published: {error}") from None
    except Unpublishable as error:
        raise CommandFailed(f"not published, the bus refuses it: {error.refused[0]}") from None
    finally:
        await broker.close()
    # Where it went: a bus that routes (RabbitMQ) may have had no consumer bound for it.
    where: dict[str, object] = {"topic": topic, "routed": not unrouted}
    if unrouted:
        where["parked_in"] = broker.unrouted_destination
        print(
            f"{SERVICE_NAME}: warning: no consumer is bound for {topic}; "
            f"the event was parked in {broker.unrouted_destination}",
            file=sys.stderr,
        )
    print(json.dumps({"id": envelope.id, "type": type_name, "key": key, **where}))
    return 0


def _asyncapi(settings: Settings, output: Path | None) -> int:
    from ..handlers import router
    from .asyncapi import document

    known = [message_type for message_type, _ in event_registry(router).unpacking.values()]
    text = json.dumps(document(settings, router, known), indent=2)
    if output is None:
        print(text)
        return 0
    try:
        output.write_text(text + "\n", encoding="utf-8")
    except OSError as error:
        raise CommandFailed(f"cannot write {output}: {error.strerror}") from None
    print(f"wrote {output}", file=sys.stderr)
    return 0


def _demo(settings: Settings) -> int:
    from ..handlers import demo_events, router
    from .demo import run_demo

    configure_logging(settings.model_copy(update={"log_level": "ERROR"}))
    print(asyncio.run(run_demo(router, demo_events())))
    return 0
