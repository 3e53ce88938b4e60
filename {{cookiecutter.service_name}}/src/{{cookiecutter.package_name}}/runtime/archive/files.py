"""The archive's table layout: one Parquet file (zstd) per writer, group and partition,
Hive-partitioned by event type and hour of the event time:

    type=<type>/date=YYYY-MM-DD/hour=HH/<writer>-<first position>-<uuid>.parquet

One row per delivered message. The partition columns (`type`, `date`, `hour`) live in
the path only (Spark and Trino refuse a column that is both in the files and in the
path). A message that is not a CloudEvent is archived too, raw, with null attributes,
under `type=_undecodable` and the hour it was archived: every message that crossed the
bus is in the archive. docs/operating.md documents the columns for Spark, Trino, Athena.
"""

from __future__ import annotations

import io
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
from google.protobuf.message import DecodeError

from ...events import cloudevents_pb2
from ..brokers.base import InboundMessage

UNDECODABLE_TYPE = "_undecodable"
COMPRESSION = "zstd"
ATTRIBUTES = ("id", "source", "subject", "time", "datacontenttype", "dataschema")
_TIMESTAMP = pa.timestamp("us", tz="UTC")
# The columns of every file. `type` is the partition column (in the path).
SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("source", pa.string()),
        pa.field("subject", pa.string()),
        pa.field("time", _TIMESTAMP),
        pa.field("datacontenttype", pa.string()),
        pa.field("dataschema", pa.string()),
        pa.field("topic", pa.string()),  # Kafka topic / RabbitMQ routing key
        pa.field("stream", pa.string()),  # Kafka topic:partition / RabbitMQ queue
        pa.field("partition", pa.int32()),  # Kafka only
        pa.field("offset", pa.int64()),  # Kafka offset (the bus's position elsewhere)
        pa.field("key", pa.string()),
        pa.field("headers", pa.map_(pa.string(), pa.string())),  # traceparent among them
        pa.field("archived_at", _TIMESTAMP),
        pa.field("archived_by", pa.string()),
        pa.field("envelope", pa.binary()),  # the message body, unchanged
    ]
)


@dataclass(frozen=True, slots=True)
class Partition:
    type: str
    date: str  # YYYY-MM-DD
    hour: str  # HH

    def folder(self) -> str:
        return f"type={quote(self.type, safe='')}/date={self.date}/hour={self.hour}"


def attributes(body: bytes) -> dict[str, Any] | None:
    """The CloudEvents attributes of a structured-mode protobuf body (type included), or
    None when the body is not one."""
    try:
        event = cloudevents_pb2.CloudEvent.FromString(body)
    except DecodeError:
        return None
    if not event.id or not event.type:
        return None
    found: dict[str, Any] = {"id": event.id, "type": event.type, "source": event.source or None}
    for name in ("subject", "datacontenttype", "dataschema"):
        value = event.attributes.get(name)
        found[name] = None if value is None else _text(value)
    time = event.attributes.get("time")
    found["time"] = (
        time.ce_timestamp.ToDatetime(tzinfo=UTC)
        if time is not None and time.HasField("ce_timestamp")
        else None
    )
    return found


def _text(value: Any) -> str:
    kind = value.WhichOneof("attr")
    return str(getattr(value, kind)) if kind is not None else ""


def _stream_partition(message: InboundMessage) -> int | None:
    """Kafka streams are `topic:partition` (brokers/kafka.py `stream_of`)."""
    head, _, tail = message.stream.rpartition(":")
    return int(tail) if head and tail.isdigit() else None


def partitioned(
    messages: Iterable[InboundMessage], archived_at: datetime, writer: str
) -> dict[Partition, list[dict[str, Any]]]:
    """The rows of `messages`, by the partition each belongs in."""
    by_partition: dict[Partition, list[dict[str, Any]]] = defaultdict(list)
    for message in messages:
        found = attributes(message.body)
        event_type = UNDECODABLE_TYPE if found is None else found.pop("type")
        when = archived_at if found is None or found["time"] is None else found["time"]
        row = dict.fromkeys(ATTRIBUTES) if found is None else found
        row.update(
            topic=message.topic,
            stream=message.stream,
            partition=_stream_partition(message),
            offset=message.position,
            key=message.key,
            headers=list(message.headers.items()),
            archived_at=archived_at,
            archived_by=writer,
            envelope=message.body,
        )
        hour = when.astimezone(UTC)
        by_partition[Partition(event_type, f"{hour:%Y-%m-%d}", f"{hour:%H}")].append(row)
    return by_partition


def parquet_bytes(rows: Sequence[dict[str, Any]]) -> bytes:
    """One Parquet file (zstd) holding `rows`."""
    table = pa.Table.from_pylist(list(rows), schema=SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression=COMPRESSION)
    return sink.getvalue()


def file_name(writer: str, first_position: int) -> str:
    """Unique however often a group is written again (a crash before its ack)."""
    return f"{quote(writer, safe='')}-{first_position}-{uuid.uuid4().hex[:12]}.parquet"
