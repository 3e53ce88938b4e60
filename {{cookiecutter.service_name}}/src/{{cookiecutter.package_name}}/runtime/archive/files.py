"""The archive's table layout: one Parquet file (zstd) per writer, group and partition,
Hive-partitioned by event type and hour of the event time:

    type=<type>/date=YYYY-MM-DD/hour=HH/<writer>-<first position>-<uuid>.parquet

One row per delivered message. The partition columns (`type`, `date`, `hour`) live in
the path only (Spark and Trino refuse a column that is both in the files and in the
path). Events of other producers in CloudEvents binary or structured JSON mode get
their attribute columns too (`envelope` and `headers` keep them as they came). A message
that is not a CloudEvent in any accepted mode is archived too, raw, with null attributes,
under `type=_undecodable` and the hour it was archived: every message that crossed the
bus is in the archive. docs/operating.md documents the columns for Spark, Trino, Athena.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
from google.protobuf.message import DecodeError

from ...events import cloudevents_pb2
from ..brokers.base import InboundMessage
from ..errors import UndecodableEvent
from ..modes import event_time, other_mode

UNDECODABLE_TYPE = "_undecodable"
COMPRESSION = "zstd"
ATTRIBUTES = ("id", "source", "subject", "time", "datacontenttype", "dataschema")
_CloudEvent = cloudevents_pb2.CloudEvent
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


@dataclass(slots=True)
class Columns:
    """One file's rows, column by column (building Arrow arrays from lists is several
    times cheaper than from one dict per row)."""

    values: dict[str, list[Any]] = field(default_factory=lambda: {n: [] for n in SCHEMA.names})

    def __len__(self) -> int:
        return len(self.values["envelope"])

    def first_position(self) -> int:
        return int(self.values["offset"][0])


def attributes(body: bytes) -> tuple[str, tuple[Any, ...]] | None:
    """The type and the other CloudEvents attributes (as ATTRIBUTES, `time` in µs since
    the epoch) of a structured-mode protobuf body, or None when it is not one."""
    try:
        event = _CloudEvent.FromString(body)
    except DecodeError:
        return None
    event_id, event_type = event.id, event.type
    if not event_id or not event_type:
        return None
    found = event.attributes
    time = None
    if "time" in found:
        stamp = found["time"].ce_timestamp
        time = stamp.seconds * 1_000_000 + stamp.nanos // 1_000
    return event_type, (
        event_id,
        event.source or None,
        _text(found["subject"]) if "subject" in found else None,
        time,
        _text(found["datacontenttype"]) if "datacontenttype" in found else None,
        _text(found["dataschema"]) if "dataschema" in found else None,
    )


def other_mode_attributes(message: InboundMessage) -> tuple[str, tuple[Any, ...]] | None:
    """As `attributes`, for an event in binary or structured JSON mode (modes.py); None
    for a message that is no CloudEvent in those modes."""
    try:
        found = other_mode(message.body, message.headers)
        if found is None:
            return None
        attributes = found[1]
        event_id, event_type = attributes.get("id"), attributes.get("type")
        if not (isinstance(event_id, str) and event_id and isinstance(event_type, str)):
            return None
        time = event_time(attributes.get("time"))
    except UndecodableEvent:
        return None
    texts = [attributes.get(name) for name in ("source", "subject")]
    texts += [attributes.get(name) for name in ("datacontenttype", "dataschema")]
    source, subject, content_type, schema = (
        value if isinstance(value, str) and value else None for value in texts
    )
    micros = None if time is None else int(time.timestamp()) * 1_000_000 + time.microsecond
    return event_type, (event_id, source, subject, micros, content_type, schema)


def _text(value: Any) -> str:
    kind = value.WhichOneof("attr")
    return str(getattr(value, kind)) if kind is not None else ""


def _stream_partition(stream: str) -> int | None:
    """Kafka streams are `topic:partition` (brokers/kafka.py `stream_of`)."""
    head, _, tail = stream.rpartition(":")
    return int(tail) if head and tail.isdigit() else None


_NO_ATTRIBUTES = (None,) * len(ATTRIBUTES)
_HOUR_US = 3_600_000_000


def partitioned(
    messages: Iterable[InboundMessage], archived_at: datetime, writer: str
) -> dict[Partition, Columns]:
    """The rows of `messages`, by the partition each belongs in."""
    archived_us = int(archived_at.timestamp() * 1_000_000)
    files: dict[tuple[str, int], Columns] = {}
    partitions: dict[str, int | None] = {}
    for message in messages:
        found = attributes(message.body) or other_mode_attributes(message)
        if found is None:
            event_type, values = UNDECODABLE_TYPE, _NO_ATTRIBUTES
        else:
            event_type, values = found
        when = values[3] if values[3] is not None else archived_us
        key = (event_type, when // _HOUR_US)
        columns = files.get(key)
        if columns is None:
            columns = files[key] = Columns()
        into = columns.values
        for name, value in zip(ATTRIBUTES, values, strict=True):
            into[name].append(value)
        stream = message.stream
        if stream not in partitions:
            partitions[stream] = _stream_partition(stream)
        into["topic"].append(message.topic)
        into["stream"].append(stream)
        into["partition"].append(partitions[stream])
        into["offset"].append(message.position)
        into["key"].append(message.key)
        into["headers"].append(list(message.headers.items()))
        into["envelope"].append(message.body)
    by_partition = {}
    for (event_type, hour), columns in files.items():
        count = len(columns)
        columns.values["archived_at"] = [archived_us] * count
        columns.values["archived_by"] = [writer] * count
        start = datetime.fromtimestamp(hour * 3600, UTC)
        by_partition[Partition(event_type, f"{start:%Y-%m-%d}", f"{start:%H}")] = columns
    return by_partition


def parquet_bytes(columns: Columns) -> bytes:
    """One Parquet file (zstd) holding `columns`."""
    values = columns.values
    table = pa.Table.from_arrays(
        [pa.array(values[f.name], type=f.type) for f in SCHEMA], schema=SCHEMA
    )
    sink = io.BytesIO()
    pq.write_table(table, sink, compression=COMPRESSION)
    return sink.getvalue()


def file_name(writer: str, first_position: int) -> str:
    """Unique however often a group is written again (a crash before its ack)."""
    return f"{quote(writer, safe='')}-{first_position}-{uuid.uuid4().hex[:12]}.parquet"
