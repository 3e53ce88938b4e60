"""What the operator commands share: times and types from the command line, the bus
reader's session, decoding a message for display, and the copy a redrive or a replay
publishes."""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from ...events import cloudevents_pb2
from ..brokers import open_reader
from ..brokers.base import (
    Broker,
    BrokerUnavailable,
    InboundMessage,
    OutboundMessage,
    Unpublishable,
)
from ..brokers.reading import BusReader, Record, no_history
from ..config import Settings
from ..dedupe import REDRIVE_HEADER
from ..envelope import EnvelopeCodec
from ..errors import CommandFailed, ConfigError, DeadLetter, UndecodableEvent
from ..modes import ContentModes

_AGE = re.compile(r"(\d+(?:\.\d+)?)(s|m|h|d|w)")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# Headers a parked copy carries that the re-published one must not: the parking
# headers, and RabbitMQ's own dead-lettering history (x-death, kept as text here).
PARKING_PREFIXES = ("x-dead-letter-", "x-death", "x-first-death-", "x-last-death-")


def point_in_time(text: str, option: str) -> datetime:
    """An age (`30s`, `10m`, `2h`, `7d`, `1w`: that long ago) or an ISO 8601 time (UTC
    unless it names a zone); ConfigError in one line otherwise."""
    given = text.strip()
    if age := _AGE.fullmatch(given):
        return datetime.now(UTC) - timedelta(seconds=float(age[1]) * _UNIT_S[age[2]])
    try:
        parsed = datetime.fromisoformat(given)
    except ValueError:
        raise ConfigError(
            f"{option} {text!r} is not a time: give an age (30s, 10m, 2h, 7d) or an "
            "ISO 8601 time (2025-05-01T12:00:00Z)"
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def positive(text: str) -> int:
    """A command-line count: a whole number above 0."""
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number above 0")
    return int(text)


def window(since: str | None, until: str | None) -> tuple[datetime | None, datetime | None]:
    """`--since` and `--until` parsed; ConfigError unless since comes before until."""
    start = None if since is None else point_in_time(since, "--since")
    end = None if until is None else point_in_time(until, "--until")
    if start is not None and end is not None and end <= start:
        raise ConfigError(f"--until {until!r} is not after --since {since!r}")
    return start, end


def resolve_types(
    patterns: Sequence[str] | None, known: Sequence[str], default: Sequence[str]
) -> list[str]:
    """The known event types matching any of `patterns` (globs), or `default` when none
    are given; ConfigError for a pattern that matches no known type."""
    if not patterns:
        return list(default)
    chosen: dict[str, None] = {}
    for pattern in patterns:
        found = [name for name in known if fnmatchcase(name, pattern)]
        if not found:
            raise ConfigError(
                f"--type {pattern!r} matches no event type this service knows "
                f"(`types` lists them): {', '.join(known)}"
            )
        chosen.update(dict.fromkeys(found))
    return list(chosen)


@asynccontextmanager
async def bus(settings: Settings, needs_history: str | None = None) -> AsyncIterator[BusReader]:
    """A connected reader; the bus not answering is one line (exit 1). `needs_history`
    names what reads the past: refused at once on a bus that keeps none (RabbitMQ)."""
    reader = open_reader(settings)
    if needs_history is not None and not reader.keeps_history:
        raise no_history(needs_history)
    try:
        await reader.start()
        yield reader
    except BrokerUnavailable as error:
        raise CommandFailed(f"the bus did not answer: {error}") from None
    finally:
        await reader.close()


def partition_of(topic: str, stream: str) -> int | None:
    """The Kafka partition a delivery of `topic` came from (its stream is "topic:N")."""
    head, _, number = stream.rpartition(":")
    return int(number) if head == topic and number.isdigit() else None


def republished(
    message: InboundMessage, topic: str, partition: int | None, redrive: str | None
) -> OutboundMessage:
    """The copy a redrive or a replay publishes: the same bytes, key and headers (trace
    context included), without parking headers; `redrive` asks a group to handle it
    again (a REDRIVE_HEADER value), None keeps the copy a duplicate to every group."""
    headers = {
        name: value
        for name, value in message.headers.items()
        if not name.startswith(PARKING_PREFIXES)
    }
    if redrive is not None:
        headers[REDRIVE_HEADER] = redrive
    return OutboundMessage(topic, message.body, message.key or "", headers, partition=partition)


async def publish_copies(broker: Broker, copies: Sequence[OutboundMessage]) -> dict[int, str]:
    """Publish and wait until the bus confirmed; returns the copies it can never take
    (index -> why), every other one being published. A bus that does not answer is
    CommandFailed, with `copies` perhaps partly published."""
    try:
        try:
            await broker.publish(copies)
            return {}
        except Unpublishable as error:  # the others are safe to publish again
            await broker.publish([c for i, c in enumerate(copies) if i not in error.refused])
            return error.refused
    except BrokerUnavailable as error:
        raise CommandFailed(f"the bus did not confirm: {error}") from None


@dataclass(frozen=True, slots=True)
class Filter:
    """What an operator picked: types, subjects (globs), ids; all when empty."""

    types: frozenset[str] = frozenset()
    subjects: tuple[str, ...] = ()
    ids: frozenset[str] = frozenset()

    def matches(self, view: Mapping[str, Any]) -> bool:
        if self.types and view.get("type") not in self.types:
            return False
        if self.ids and view.get("id") not in self.ids:
            return False
        subject = view.get("subject", "")
        return not self.subjects or any(fnmatchcase(subject, s) for s in self.subjects)


def describe(codec: EnvelopeCodec, record: Record) -> dict[str, Any]:
    """A message for display and for filters: where it was, its CloudEvents attributes
    and its payload as JSON (an unknown type's payload in base64), or why it does not
    decode (its bytes in base64)."""
    message = record.message
    view: dict[str, Any] = {
        "topic": message.topic,
        "stream": message.stream,
        "position": message.position,
        "key": message.key or "",
        "bus_time": _iso(record.at),
    }
    try:
        envelope = ContentModes(codec).decode_bytes(message.body, message.headers)
    except UndecodableEvent as error:
        view["error"] = f"{error.reason}: {error.detail}"
        view["body_base64"] = base64.b64encode(message.body).decode()
        return view
    view.update(
        id=envelope.id, type=envelope.type, source=envelope.source, subject=envelope.subject
    )
    try:
        view["time"] = _iso(envelope.time)
        view["extensions"] = dict(envelope.extensions)
    except DeadLetter as error:  # an attribute no datetime holds
        view["error"] = str(error)
    if envelope.payload is not None:
        view["payload"] = json_format.MessageToDict(envelope.payload)
    else:
        view["payload_base64"] = _packed_payload(message.body)
    return view


def event_line(view: Mapping[str, Any]) -> str:
    """One line per event: time, type, id, subject, key."""
    when = view.get("time") or view.get("bus_time") or "-"
    if "type" not in view:
        return f"{when}  -  -  {view.get('error', 'undecodable')}  key={view['key']}"
    return f"{when}  {view['type']}  {view['id']}  subject={view['subject']}  key={view['key']}"


def payload_json(view: Mapping[str, Any]) -> str:
    if "payload" in view:
        return json.dumps(view["payload"], sort_keys=True)
    return json.dumps({"base64": view.get("payload_base64") or view.get("body_base64", "")})


def emit_line(text: str) -> None:
    """A line of output now (a tail is piped into other tools)."""
    print(text, flush=True)


def note(text: str) -> None:
    """A line for the operator, not the data: on stderr."""
    print(text, file=sys.stderr, flush=True)


def unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _iso(when: datetime | None) -> str | None:
    if when is None:
        return None
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _packed_payload(body: bytes) -> str:
    try:
        packed = cloudevents_pb2.CloudEvent.FromString(body).proto_data.value
    except DecodeError:
        packed = b""
    return base64.b64encode(packed).decode()
