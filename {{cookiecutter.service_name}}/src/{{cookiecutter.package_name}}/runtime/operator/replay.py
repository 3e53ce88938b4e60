"""`replay`: re-publish a time window of topics from the bus's history (Kafka), into the
same topics (each copy to its original's partition) or into another topic. The
production group's offsets are not touched: the window is read without a group.

Copies keep their ids and bytes, so a service that handled them drops them as
duplicates; `--reprocess` (this service's group) or `--group NAME` (another's) marks
them with a redrive generation that group's dedupe honours, one past the original's, so
replaying one window twice still runs its handlers once.

`--from-archive` reads the window from the event archive (ARCHIVE_URL) instead: any bus
(RabbitMQ keeps no history), further filters (--subject, --source), the original bytes
re-published in event-time order, each id once; `--rate` limits it and `--resume NAME`
records how far it got, so the same command run again after a crash goes on from there."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from ..app import event_registry
from ..brokers import open_broker
from ..brokers.base import Broker, BrokerUnavailable, InboundMessage, OutboundMessage
from ..config import Settings
from ..dedupe import next_redrive
from ..errors import CommandFailed, ConfigError
from ..objectstore import (
    ObjectNotFound,
    ObjectStore,
    check,
    load_object_store_settings,
    open_object_store,
)
from .common import (
    bus,
    emit_line,
    partition_of,
    positive,
    publish_copies,
    republished,
    resolve_types,
    window,
)
from .events import selection_of
from .progress import Progress

BATCH = 500  # copies published (and confirmed) together


def register(commands: Any) -> None:
    replay = commands.add_parser(
        "replay",
        help="re-publish a time window of events from the bus (Kafka) or the archive",
        description="Re-publish the events the bus took between --since and --until (Kafka: "
        "by offsets-for-times, without a consumer group) into their own topics or --to-topic. "
        "Copies keep their ids: services that handled them drop them, unless --reprocess "
        "(this service) or --group NAME (another one) asks that group to handle them again.",
    )
    replay.add_argument(
        "--since", metavar="TIME", help="10m, 2h, 7d or ISO 8601 (optional --from-archive)"
    )
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
    archive = replay.add_argument_group("from the archive")
    archive.add_argument(
        "--from-archive",
        action="store_true",
        help="read the window from the event archive (ARCHIVE_URL), any bus",
    )
    archive.add_argument("--subject", dest="subjects", action="append", metavar="GLOB")
    archive.add_argument("--source", dest="sources", action="append", metavar="GLOB")
    archive.add_argument("--rate", type=positive, metavar="N", help="at most N events a second")
    archive.add_argument(
        "--resume",
        metavar="NAME",
        help="record progress as NAME in the archive; run again to go on after a crash",
    )
    replay.add_argument("--json", action="store_true", help="JSON progress and summary")


async def run(settings: Settings, args: argparse.Namespace) -> int:
    from ...handlers import router

    if args.from_archive:
        return await _from_archive(settings, args)
    archive_only = {"--subject": args.subjects, "--source": args.sources, "--rate": args.rate}
    archive_only["--resume"] = args.resume
    if given := [name for name, value in archive_only.items() if value]:
        raise ConfigError(f"{', '.join(given)}: only with --from-archive")
    if args.since is None:
        raise ConfigError("--since is required (but with --from-archive)")

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


RESUME_PREFIX = "_replays/"  # progress of `--resume NAME` replays, beside the files


async def _from_archive(settings: Settings, args: argparse.Namespace) -> int:
    """Re-publish the chosen archived events, in event-time order, each id once."""
    if args.to_topic is not None and args.to_topic.strip() == "":
        raise ConfigError("--to-topic needs a topic name")
    group = args.group or (settings.consumer_group if args.reprocess else None)
    store = open_object_store(load_object_store_settings())
    await check(store)
    from ..archive.reading import open_events  # DuckDB and Arrow: only for the archive

    events = await open_events(store, selection_of(args))
    total = events.execute("SELECT count(*) FROM events").fetchone()
    progress = Progress("replay", None if total is None else int(total[0]), as_json=args.json)
    done = await _resumed(store, args.resume)
    if done:
        progress.add(read=done, matched=done, skipped=done)
    order = 'SELECT topic, stream, partition, "offset", key, headers, envelope FROM events'
    rows = events.execute(f"{order} OFFSET {done}").to_arrow_reader(BATCH)
    broker = open_broker(settings)
    pace = _Pace(args.rate)
    try:
        if not args.dry_run:
            await broker.start([])
        for batch in rows:
            copies = [_copy(row, args.to_topic, group) for row in batch.to_pylist()]
            progress.add(read=len(copies), matched=len(copies))
            for part in pace.parts(copies):
                await pace.wait()
                sent = len(part)  # (_publish empties the list)
                await _publish(broker, part, progress, dry_run=args.dry_run)
                pace.count(sent)
                done += sent
                if args.resume and not args.dry_run:
                    await _record(store, args.resume, done)
    except BrokerUnavailable as error:
        raise CommandFailed(f"the bus did not answer: {error}") from None
    finally:
        await broker.close()
    summary = progress.finish()
    emit_line(progress.summary_line(summary))
    return 1 if summary["failed"] else 0


def _copy(row: dict[str, Any], to_topic: str | None, group: str | None) -> OutboundMessage:
    headers = dict(row["headers"] or ())
    message = InboundMessage(row["envelope"], row["topic"], row["stream"], row["offset"] or 0)
    message.key, message.headers = row["key"], headers
    topic = to_topic or row["topic"]
    partition = None if to_topic else row["partition"]  # where the original was (Kafka)
    redrive = None if group is None else next_redrive(headers, group)
    return republished(message, topic, partition, redrive)


async def _resumed(store: ObjectStore, name: str | None) -> int:
    """How many events the replay `name` re-published before (0 for a new one)."""
    if name is None:
        return 0
    try:
        recorded = json.loads(await store.get(RESUME_PREFIX + name + ".json"))
    except ObjectNotFound:
        return 0
    return int(recorded["published"])


async def _record(store: ObjectStore, name: str, published: int) -> None:
    await store.put(RESUME_PREFIX + name + ".json", json.dumps({"published": published}).encode())


class _Pace:
    """At most `rate` events a second (None: as fast as the bus confirms)."""

    def __init__(self, rate: int | None) -> None:
        self.rate = rate
        self.started = time.monotonic()
        self.sent = 0

    def parts(self, copies: list[OutboundMessage]) -> list[list[OutboundMessage]]:
        size = len(copies) if self.rate is None else max(1, min(BATCH, self.rate // 10 or 1))
        return [copies[i : i + size] for i in range(0, len(copies), size)]

    async def wait(self) -> None:
        if self.rate is not None:
            ahead = self.sent / self.rate - (time.monotonic() - self.started)
            if ahead > 0:
                await asyncio.sleep(ahead)

    def count(self, sent: int) -> None:
        self.sent += sent
