"""`events query`: the event viewer over the archive (ARCHIVE_URL). Prints the chosen
events with their payloads decoded by this service's types (JSON, one per line), or
counts per type and hour, or the rows of any SQL over the view `events` (DuckDB)."""

from __future__ import annotations

import argparse
import base64
import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ..app import event_registry
from ..brokers.base import InboundMessage
from ..brokers.reading import Record
from ..config import Settings
from ..envelope import CloudEventsProtobufCodec
from ..errors import ConfigError
from ..objectstore import check, load_object_store_settings, open_object_store
from .common import describe, emit_line, positive, window

if TYPE_CHECKING:  # DuckDB and Arrow are imported by the commands that read the archive
    from ..archive.reading import Selection

EVENTS_VIEW = "events"  # archive/reading.py's view

COUNTS_SQL = (
    f"SELECT type, date, hour, count(*) AS events FROM {EVENTS_VIEW} "
    "GROUP BY type, date, hour ORDER BY date, hour, type"
)


def add_selection(parser: argparse.ArgumentParser, *, since_required: bool = False) -> None:
    """The archive's filters, shared by `events query` and `replay --from-archive`."""
    parser.add_argument(
        "--since", required=since_required, metavar="TIME", help="10m, 2h, 7d or ISO 8601"
    )
    parser.add_argument("--until", metavar="TIME", help="end of the window (default: now)")
    parser.add_argument(
        "--type", dest="types", action="append", metavar="GLOB", help="event types, repeatable"
    )
    parser.add_argument(
        "--subject", dest="subjects", action="append", metavar="GLOB", help="subjects (keys)"
    )
    parser.add_argument(
        "--source", dest="sources", action="append", metavar="GLOB", help="event sources"
    )


def selection_of(args: argparse.Namespace) -> Selection:
    from ..archive.reading import Selection

    since, until = window(args.since, args.until)
    return Selection(
        since=since,
        until=until,
        types=tuple(args.types or ()),
        subjects=tuple(args.subjects or ()),
        sources=tuple(args.sources or ()),
    )


def register(commands: Any) -> None:
    events = commands.add_parser("events", help="the event archive: query it")
    actions = events.add_subparsers(dest="events_command", required=True, metavar="ACTION")
    query = actions.add_parser(
        "query",
        help="print archived events (payloads decoded), counts, or any SQL",
        description="Read the archive at ARCHIVE_URL: the events chosen by the filters, "
        f"each id once, in event-time order. --sql runs any DuckDB SQL over the view "
        f"`{EVENTS_VIEW}` (the chosen events; columns as in docs/runbook.md).",
    )
    add_selection(query)
    shown = query.add_mutually_exclusive_group()
    shown.add_argument("--counts", action="store_true", help="counts per type and hour")
    shown.add_argument("--sql", metavar="QUERY", help=f"SQL over the view `{EVENTS_VIEW}`")
    query.add_argument("--limit", type=positive, metavar="N", help="at most N events")


async def run(settings: Settings, args: argparse.Namespace) -> int:
    from ..archive.reading import open_events, run_sql

    selection = selection_of(args)
    store = open_object_store(load_object_store_settings())
    await check(store)
    connection = await open_events(store, selection)
    if args.sql is not None or args.counts:
        table = run_sql(connection, args.sql or COUNTS_SQL)
        for row in table.to_pylist():
            emit_line(json.dumps(row, default=_json_value))
        return 0
    codec = CloudEventsProtobufCodec(event_registry())
    limit = f" LIMIT {args.limit}" if args.limit else ""
    rows = connection.execute(f"SELECT * FROM {EVENTS_VIEW}{limit}").to_arrow_table()
    for row in rows.to_pylist():
        emit_line(json.dumps(event_view(codec, row), default=_json_value))
    return 0


def event_view(codec: CloudEventsProtobufCodec, row: dict[str, Any]) -> dict[str, Any]:
    """An archived event as `tail` shows one, plus where and when it was archived."""
    message = InboundMessage(
        row["envelope"],
        row["topic"],
        row["stream"],
        row["offset"],
        row["key"],
        dict(row["headers"] or ()),
    )
    archived_at = _utc(row["archived_at"])
    view = describe(codec, Record(message, archived_at))
    view.pop("bus_time", None)
    view.update(
        archived_at=_json_value(archived_at),
        headers=message.headers,
        partition=row["partition"],
    )
    return view


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return _utc(value).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise ConfigError(f"--sql: a column of type {type(value).__name__} cannot be printed")


def _utc(when: datetime) -> datetime:
    """DuckDB hands timestamps with a zone back naive in UTC (SET TimeZone)."""
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
