"""`tail`: read and decode events as they pass, without disturbing the service's
consumers (Kafka: no consumer group, no commit; RabbitMQ: a private queue)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..app import event_registry
from ..brokers.reading import Start
from ..config import Settings
from ..envelope import CloudEventsProtobufCodec
from .common import (
    Filter,
    bus,
    describe,
    emit_line,
    event_line,
    note,
    payload_json,
    positive,
    resolve_types,
    window,
)


def register(commands: Any) -> None:
    tail = commands.add_parser(
        "tail",
        help="print events as they pass on the bus, without consuming them",
        description="Print events as they pass on the bus: one line each (time, type, id, "
        "subject, key), their payloads, or JSON. Reads only: Kafka without a consumer group "
        "or commit, RabbitMQ through a private auto-delete queue. Stops after --count events, "
        "at --until, or on Ctrl-C.",
    )
    tail.add_argument(
        "--type",
        dest="types",
        action="append",
        metavar="GLOB",
        help="event type, globs allowed, repeatable (default: every type `types` lists)",
    )
    tail.add_argument("--subject", action="append", metavar="GLOB", help="only these subjects")
    tail.add_argument("--id", dest="ids", action="append", metavar="ID", help="only this id")
    start = tail.add_mutually_exclusive_group()
    start.add_argument(
        "--from-beginning", action="store_true", help="from the oldest event kept (Kafka)"
    )
    start.add_argument(
        "--since", metavar="TIME", help="from this time: 10m, 2h, 7d or ISO 8601 (Kafka)"
    )
    tail.add_argument("--until", metavar="TIME", help="stop at this time")
    tail.add_argument("--count", type=positive, metavar="N", help="stop after N events")
    shown = tail.add_mutually_exclusive_group()
    shown.add_argument(
        "--payload", action="store_true", help="print each payload as JSON (unknown types: base64)"
    )
    shown.add_argument("--json", action="store_true", help="one JSON object per event")


async def run(settings: Settings, args: argparse.Namespace) -> int:
    registry = event_registry()
    known = registry.names()
    types = resolve_types(args.types, known, known)
    since, until = window(args.since, args.until)
    # The types chose the topics (or bindings); undecodable messages on them are shown too.
    chosen = Filter(subjects=tuple(args.subject or ()), ids=frozenset(args.ids or ()))
    codec = CloudEventsProtobufCodec(registry)
    start: Start = "beginning" if args.from_beginning else since or "end"
    shown = 0
    past = None if start == "end" else "tail --since/--from-beginning"
    async with bus(settings, needs_history=past) as reader:
        reading = await reader.read(types, start, until, follow=True)
        where = (
            "now" if start == "end" else ("the beginning" if args.from_beginning else args.since)
        )
        if reading.total == 0:  # Kafka: none of their topics exists yet
            note(f"tail: no topic of {', '.join(types)} exists yet: nothing to read")
            return 0
        note(f"tail: reading {len(types)} event type(s) from {where}; Ctrl-C stops")
        async for record in reading.records:
            view = describe(codec, record)
            if not chosen.matches(view):
                continue
            emit_line(_shown(view, args))
            shown += 1
            if args.count is not None and shown >= args.count:
                break
    return 0


def _shown(view: dict[str, Any], args: argparse.Namespace) -> str:
    if args.json:
        return json.dumps(view, sort_keys=True)
    if args.payload:
        return payload_json(view)
    return event_line(view)
