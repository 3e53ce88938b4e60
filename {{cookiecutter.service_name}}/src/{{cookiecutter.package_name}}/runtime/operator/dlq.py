"""`dlq list|show|redrive`: the dead-letter destination read without consuming it, and
parked messages published back where they came from, to be handled once more.

A redrive's copy carries a redrive generation (dedupe.REDRIVE_HEADER) naming this
service's group, one past the parked copy's: the service handles it although its id is
in the dedupe window, every other group drops it as a duplicate, and publishing one
parked message twice (a redrive run again, or after a crash) runs the handler once.
RabbitMQ: a parked message is acked once its copy is confirmed. Kafka: the redrive
commits how far it read in a group of its own (one per selection), so running it again
continues there; the dead-letter topic itself is never rewritten."""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

from ..app import event_registry
from ..brokers.base import (
    DLQ_ERROR,
    DLQ_ORIGIN,
    DLQ_REASON,
    DLQ_SERVICE,
    DLQ_TIME,
    DLQ_TRUNCATED,
    BrokerUnavailable,
    OutboundMessage,
)
from ..brokers.reading import BusReader, Reading, Record
from ..config import Settings
from ..dedupe import next_redrive
from ..envelope import CloudEventsProtobufCodec
from ..errors import CommandFailed
from ..router import Router
from .common import (
    Filter,
    bus,
    describe,
    emit_line,
    event_line,
    partition_of,
    point_in_time,
    positive,
    publish_copies,
    republished,
    resolve_types,
)
from .progress import Progress

READ_BOUND = 10_000  # parked messages read at most (RabbitMQ holds each unacked meanwhile)
BATCH = 100  # copies published (and confirmed) together, then settled
IDS_SHOWN = 3  # ids listed per group by `dlq list`


def register(commands: Any) -> None:
    dlq = commands.add_parser(
        "dlq",
        help="list, show and redrive parked (dead-lettered) messages",
        description="The dead-letter destination, read without consuming it.",
    )
    actions = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list", help="count parked messages by reason, type and origin topic"
    )
    _selection(listing)
    show = actions.add_parser("show", help="the parked messages of one event id, decoded")
    show.add_argument("id", help="event id (CloudEvents id)")
    show.add_argument(
        "--type",
        dest="types",
        action="append",
        metavar="GLOB",
        help="Kafka: read the dead-letter topics of these types only (default: those handled)",
    )
    redrive = actions.add_parser(
        "redrive",
        help="publish parked messages back to their origin, to be handled once more",
        description="Publish parked messages back to the topic they came from "
        "(x-dead-letter-origin), marked so that this service handles them once more although "
        "their ids are in its dedupe window. Running the same redrive again does not run a "
        "handler twice; on Kafka it continues where the last run got to.",
    )
    _selection(redrive)
    redrive.add_argument("--limit", type=positive, metavar="N", help="redrive at most N")
    redrive.add_argument("--dry-run", action="store_true", help="say what would be redriven")
    for parser in (listing, show, redrive):
        parser.add_argument("--json", action="store_true", help="JSON output")
        parser.add_argument(
            "--max-read",
            type=positive,
            default=READ_BOUND,
            metavar="N",
            help=f"read at most N parked messages (default {READ_BOUND})",
        )


def _selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", action="append", metavar="REASON", help="repeatable")
    parser.add_argument(
        "--type", dest="types", action="append", metavar="GLOB", help="repeatable, globs"
    )
    parser.add_argument("--id", dest="ids", action="append", metavar="ID", help="repeatable")
    parser.add_argument("--since", metavar="TIME", help="parked since: 10m, 2h, 7d or ISO 8601")


async def run(settings: Settings, args: argparse.Namespace) -> int:
    from ...handlers import router

    parked = _Parked(settings, router, args)
    async with bus(settings) as reader:
        if args.action == "list":
            return await parked.listing(reader)
        if args.action == "show":
            return await parked.show(reader)
        return await parked.redrive(reader)


class _Parked:
    def __init__(self, settings: Settings, router: Router, args: argparse.Namespace) -> None:
        self.settings = settings
        self.args = args
        registry = event_registry(router)
        self.codec = CloudEventsProtobufCodec(registry)
        # Whose dead letters to read (Kafka: their topics' dead-letter topics).
        chosen = getattr(args, "types", None)
        self.types = resolve_types(chosen, registry.names(), router.event_types())
        if args.action == "show":
            self.filter, self.reasons, self.since = Filter(ids=frozenset([args.id])), None, None
        else:
            picked = frozenset(self.types) if chosen else frozenset()
            self.filter = Filter(picked, ids=frozenset(args.ids or ()))
            self.reasons = frozenset(args.reason) if args.reason else None
            self.since = None if args.since is None else point_in_time(args.since, "--since")

    def view(self, record: Record) -> dict[str, Any] | None:
        """A parked message of this service, decoded with its parking headers; None when
        another service parked it (a Kafka dead-letter topic may be shared)."""
        headers = record.message.headers
        service = headers.get(DLQ_SERVICE)
        if service is not None and service != self.settings.consumer_group:
            return None
        view = describe(self.codec, record)
        origin = headers.get(DLQ_ORIGIN)
        # Parked by RabbitMQ itself (the delivery limit): no parking headers, its own
        # routing key kept.
        topic = origin.split("|", 1)[0] if origin else record.message.topic
        stream = origin.split("|")[1] if origin and origin.count("|") >= 2 else ""
        view.update(
            reason=headers.get(DLQ_REASON) or ("delivery-limit" if "x-death" in headers else "-"),
            detail=headers.get(DLQ_ERROR, ""),
            origin=origin or topic,
            origin_topic=topic,
            origin_partition=partition_of(topic, stream),
            parked_at=headers.get(DLQ_TIME) or view["bus_time"],
            truncated=headers.get(DLQ_TRUNCATED, "none"),
        )
        return view

    def selected(self, view: dict[str, Any]) -> bool:
        if self.reasons is not None and view["reason"] not in self.reasons:
            return False
        if self.since is not None:
            parked_at = view["parked_at"]
            if parked_at is None or point_in_time(parked_at, "parked at") < self.since:
                return False
        return self.filter.matches(view)

    async def _read(
        self, reader: BusReader, action: str, resume: str | None = None
    ) -> tuple[Reading, Progress]:
        reading = await reader.parked(self.types, resume=resume, bound=self.args.max_read)
        return reading, Progress(action, reading.total, as_json=self.args.json)

    async def _bounded(self, reading: Reading) -> AsyncIterator[Record]:
        """At most --max-read parked messages (the reader may bound them itself)."""
        count = 0
        async for record in reading.records:
            if count >= self.args.max_read:
                return
            count += 1
            yield record

    async def listing(self, reader: BusReader) -> int:
        reading, progress = await self._read(reader, "dlq list")
        groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
        async for record in self._bounded(reading):
            progress.add(read=1)
            view = self.view(record)
            if view is None or not self.selected(view):
                continue
            progress.add(matched=1)
            groups[view["reason"], view.get("type", "-"), view["origin_topic"]].append(view)
        summary = progress.finish()
        rows: list[dict[str, Any]] = [
            {
                "reason": reason,
                "type": event_type,
                "origin": origin,
                "count": len(views),
                "newest": max((v["parked_at"] or "" for v in views), default=""),
                "ids": [v.get("id", "-") for v in views[:IDS_SHOWN]],
            }
            for (reason, event_type, origin), views in sorted(groups.items())
        ]
        if self.args.json:
            emit_line(json.dumps({"groups": rows, "summary": summary}))
            return 0
        for row in rows:
            more = " ..." if row["count"] > IDS_SHOWN else ""
            emit_line(
                f"{row['count']:>6}  {row['reason']}  {row['type']}  from {row['origin']}  "
                f"newest {row['newest'] or '-'}  ids {' '.join(row['ids'])}{more}"
            )
        emit_line(progress.summary_line(summary))
        return 0

    async def show(self, reader: BusReader) -> int:
        reading, progress = await self._read(reader, "dlq show")
        found = []
        async for record in self._bounded(reading):
            progress.add(read=1)
            view = self.view(record)
            if view is not None and self.selected(view):
                progress.add(matched=1)
                view["headers"] = dict(record.message.headers)
                found.append(view)
        summary = progress.finish()
        if not found:
            raise CommandFailed(
                f"no parked message of this service has id {self.args.id!r} "
                f"(read {summary['read']})"
            )
        if self.args.json:
            emit_line(json.dumps({"parked": found}, sort_keys=True))
            return 0
        for view in found:
            emit_line(_shown(view))
        return 0

    async def redrive(self, reader: BusReader) -> int:
        resume = self._resume_name()
        reading, progress = await self._read(reader, "dlq redrive", resume)
        read: list[Record] = []  # since the last settle
        sending: list[tuple[Record, OutboundMessage]] = []
        try:
            async for record in self._bounded(reading):
                if self.args.limit is not None and progress.counts["matched"] >= self.args.limit:
                    break  # not read, as far as a resumed redrive is concerned
                read.append(record)
                progress.add(read=1)
                view = self.view(record)
                if view is None or not self.selected(view):
                    continue
                progress.add(matched=1)
                copy = self._copy(record, view)
                if copy is None:
                    progress.add(skipped=1)
                elif self.args.dry_run:
                    emit_line(self._planned(view, copy))
                else:
                    sending.append((record, copy))
                    if len(sending) >= BATCH:
                        await self._send(reader, read, sending, progress)
            if not self.args.dry_run:
                await self._send(reader, read, sending, progress)
        except CommandFailed:
            progress.finish()
            raise
        summary = progress.finish()
        emit_line(progress.summary_line(summary))
        return 1 if summary["failed"] else 0

    def _copy(self, record: Record, view: dict[str, Any]) -> OutboundMessage | None:
        """The copy to publish; None when it cannot be redriven (cut to fit, or no origin)."""
        if "body" in view["truncated"] or not view["origin_topic"]:
            return None
        group = self.settings.consumer_group
        message = record.message
        return republished(
            message,
            view["origin_topic"],
            view["origin_partition"],
            next_redrive(message.headers, group),
        )

    async def _send(
        self,
        reader: BusReader,
        read: list[Record],
        sending: list[tuple[Record, OutboundMessage]],
        progress: Progress,
    ) -> None:
        """Publish the copies, then settle what was read: confirmed copies' parked
        messages acked (RabbitMQ), the progress recorded (Kafka)."""
        try:
            refused = await publish_copies(reader.broker, [copy for _, copy in sending])
            redriven = [record for i, (record, _) in enumerate(sending) if i not in refused]
            await reader.settle(read, redriven)
        except (CommandFailed, BrokerUnavailable) as error:
            done = progress.counts["republished"]
            raise CommandFailed(
                f"{error}; re-published before: {done}. Run the same redrive again to "
                "continue: a copy published twice is still handled once"
            ) from None
        progress.add(republished=len(redriven), failed=len(refused))
        read.clear()
        sending.clear()

    def _resume_name(self) -> str:
        """The group a Kafka redrive records its progress in: one per selection, so the
        same redrive continues where it got to and another one reads from the start."""
        args = self.args
        chosen = [
            sorted(args.reason or ()),
            sorted(args.types or ()),
            sorted(args.ids or ()),
            args.since,
        ]
        name = f"{self.settings.consumer_group}.redrive"
        if any(chosen):
            name += "." + hashlib.sha256(json.dumps(chosen).encode()).hexdigest()[:12]
        return name

    def _planned(self, view: dict[str, Any], copy: OutboundMessage) -> str:
        if self.args.json:
            return json.dumps(
                {"would_republish": view.get("id"), "to": copy.topic, "reason": view["reason"]}
            )
        return f"would re-publish to {copy.topic}: {event_line(view)}  ({view['reason']})"


def _shown(view: dict[str, Any]) -> str:
    lines = [
        f"parked message {view.get('id', '(undecodable)')}",
        f"  reason:    {view['reason']}",
        f"  error:     {view['detail']}",
        f"  origin:    {view['origin']}",
        f"  parked at: {view['parked_at'] or '-'}",
    ]
    if view["truncated"] != "none":
        lines.append(f"  cut:       {view['truncated']}")
    for name in ("type", "source", "subject", "time", "key"):
        if name in view:
            lines.append(f"  {name + ':':<10} {view[name]}")
    if "error" in view:
        lines.append(f"  undecodable: {view['error']}")
    if "payload" in view:
        lines.append("  payload:")
        lines += [f"    {line}" for line in json.dumps(view["payload"], indent=2).splitlines()]
    else:
        lines.append(f"  payload (base64): {view.get('payload_base64') or view.get('body_base64')}")
    return "\n".join(lines)
