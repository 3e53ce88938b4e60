"""`replay`: re-publish a time window of topics from the bus's history (Kafka), into the
same topics (each copy to its original's partition) or into another topic. The
production group's offsets are not touched: the window is read without a group.

Copies keep their ids and bytes, so a service that handled them drops them as
duplicates; `--reprocess` (this service's group) or `--group NAME` (another's) marks
them with a redrive generation that group's dedupe honours, one past the original's, so
replaying one window twice still runs its handlers once. RabbitMQ keeps no history: the
archive (a later version) will replay it."""

from __future__ import annotations

import argparse
from typing import Any

from ..app import event_registry
from ..brokers.base import Broker, OutboundMessage
from ..config import Settings
from ..dedupe import next_redrive
from ..errors import CommandFailed, ConfigError
from .common import (
    bus,
    emit_line,
    partition_of,
    publish_copies,
    republished,
    resolve_types,
    window,
)
from .progress import Progress

BATCH = 500  # copies published (and confirmed) together


def register(commands: Any) -> None:
    replay = commands.add_parser(
        "replay",
        help="re-publish a time window of events from the bus (Kafka)",
        description="Re-publish the events the bus took between --since and --until (Kafka: "
        "by offsets-for-times, without a consumer group) into their own topics or --to-topic. "
        "Copies keep their ids: services that handled them drop them, unless --reprocess "
        "(this service) or --group NAME (another one) asks that group to handle them again.",
    )
    replay.add_argument("--since", required=True, metavar="TIME", help="10m, 2h, 7d or ISO 8601")
    replay.add_argument("--until", metavar="TIME", help="end of the window (default: now)")
    replay.add_argument(
        "--type",
        dest="types",
        action="append",
        metavar="GLOB",
        help="event types, globs, repeatable (default: the types this service handles)",
    )
    target = replay.add_mutually_exclusive_group()
    target.add_argument("--to-topic", metavar="NAME", help="publish the copies to this topic")
    target.add_argument(
        "--group", metavar="NAME", help="have consumer group NAME handle the copies again"
    )
    replay.add_argument(
        "--reprocess", action="store_true", help="have this service handle the copies again"
    )
    replay.add_argument("--dry-run", action="store_true", help="count, publish nothing")
    replay.add_argument("--json", action="store_true", help="JSON progress and summary")


async def run(settings: Settings, args: argparse.Namespace) -> int:
    from ...handlers import router

    types = resolve_types(args.types, event_registry(router).names(), router.event_types())
    since, until = window(args.since, args.until)
    if args.to_topic is not None and args.to_topic.strip() == "":
        raise ConfigError("--to-topic needs a topic name")
    group = args.group or (settings.consumer_group if args.reprocess else None)
    async with bus(settings, needs_history="replay") as reader:
        reading = await reader.read(types, since or "beginning", until, follow=False)
        progress = Progress("replay", reading.total, as_json=args.json)
        copies: list[OutboundMessage] = []
        async for record in reading.records:
            progress.add(read=1, matched=1)
            message = record.message
            if args.to_topic:
                topic, partition = args.to_topic, None
            else:
                topic, partition = message.topic, partition_of(message.topic, message.stream)
            redrive = None if group is None else next_redrive(message.headers, group)
            copies.append(republished(message, topic, partition, redrive))
            if len(copies) >= BATCH:
                await _publish(reader.broker, copies, progress, dry_run=args.dry_run)
        await _publish(reader.broker, copies, progress, dry_run=args.dry_run)
        summary = progress.finish()
    emit_line(progress.summary_line(summary))
    return 1 if summary["failed"] else 0


async def _publish(
    broker: Broker, copies: list[OutboundMessage], progress: Progress, *, dry_run: bool
) -> None:
    if dry_run:
        progress.add(skipped=len(copies))
    elif copies:
        try:
            refused = await publish_copies(broker, copies)
        except CommandFailed as error:
            progress.finish()
            done = progress.counts["republished"]
            raise CommandFailed(f"{error}; re-published before: {done}") from None
        progress.add(republished=len(copies) - len(refused), failed=len(refused))
    copies.clear()
