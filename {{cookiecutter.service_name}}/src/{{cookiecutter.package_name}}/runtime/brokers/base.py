"""The broker interface every adapter implements, and what all adapters share."""

from __future__ import annotations

import asyncio
import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from ..envelope import Envelope, EnvelopeCodec

# Headers on dead-lettered messages (the body is the original bytes, unless truncated).
DLQ_REASON = "x-dead-letter-reason"
DLQ_ERROR = "x-dead-letter-error"
DLQ_ORIGIN = "x-dead-letter-origin"
DLQ_SERVICE = "x-dead-letter-service"
DLQ_TIME = "x-dead-letter-time"  # when it was parked (ISO 8601, UTC)
# Only on a dead letter cut to fit the bus: the original body size, and what was cut.
DLQ_ORIGINAL_SIZE = "x-dead-letter-original-size"
DLQ_TRUNCATED = "x-dead-letter-truncated"
MAX_ERROR_HEADER = 1024
# Header values copied from the original onto a dead letter that had to be cut to fit.
MAX_PARKED_HEADER = 1024
# The structured-mode content type of an event (CloudEvents Kafka binding: this header;
# AMQP binding: the message's content-type property, which the RabbitMQ adapter sets).
CONTENT_TYPE_HEADER = "content-type"
# What any bus takes besides the body: the key, and all header names and values together
# (RabbitMQ carries both in one frame, 128 KiB by default; see PublishLimits).
MAX_KEY_BYTES = 16 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_TOPIC_BYTES = 249  # Kafka's longest topic name (RabbitMQ's routing keys: 255)


NO_HEADERS: Mapping[str, str] = MappingProxyType({})  # shared by every message without any
NO_ATTRIBUTES: Mapping[str, Any] = MappingProxyType({})

# Called with the streams a consumer gave up (a Kafka rebalance).
OnRevoked = Callable[[set[str]], None]


class BrokerUnavailable(Exception):
    """The bus did not confirm a publish or an ack; the loop retries and does not ack."""


class Unpublishable(Exception):
    """Messages the bus can never take (too large, a key or headers too long): retrying
    cannot help. `refused` maps their index in the published sequence to why. Messages
    not refused may or may not have been published: publishing them again is safe."""

    def __init__(self, refused: Mapping[int, str]) -> None:
        super().__init__("; ".join(f"message {i}: {why}" for i, why in refused.items()))
        self.refused = dict(refused)


@dataclass(slots=True)
class InboundMessage:
    """A delivered message. `stream` is the unit of order and progress (queue, partition)."""

    body: bytes
    topic: str
    stream: str
    position: int
    key: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    redelivered: bool = False
    # The adapter's own delivery object (an aio-pika message, ...); opaque to the loop.
    handle: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    topic: str
    body: bytes
    key: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    # Parked, not emitted: Kafka sends it to `topic`, RabbitMQ to the dead-letter exchange.
    dead_letter: bool = False
    # The delivery this message answers: the event it was emitted for, or the one parked.
    origin: InboundMessage | None = field(default=None, compare=False, repr=False)
    # Kafka: the partition to write to (a redrive or replay puts a copy where the original
    # was, so that partition's dedupe window knows it); None: chosen by the key.
    partition: int | None = None


def event_message(
    codec: EnvelopeCodec,
    envelope: Envelope,
    topic: str,
    headers: Mapping[str, str] = NO_HEADERS,
    origin: InboundMessage | None = None,
) -> OutboundMessage:
    """An event as every publisher puts it on the bus (the loop, `emit`, the test harness):
    structured-mode CloudEvent with its content type, keyed by its subject."""
    return OutboundMessage(
        topic,
        codec.encode(envelope),
        envelope.subject,
        {CONTENT_TYPE_HEADER: codec.content_type, **headers},
        origin=origin,
    )


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    message: InboundMessage
    reason: str
    error: str


def dead_letter_message(
    record: DeadLetterRecord, destination: str, service: str
) -> OutboundMessage:
    """The message parked in the dead-letter destination: original bytes, reason headers."""
    origin = record.message
    headers = dict(origin.headers)
    headers.update(
        {
            DLQ_REASON: record.reason,
            DLQ_ERROR: record.error[:MAX_ERROR_HEADER],
            DLQ_ORIGIN: f"{origin.topic}|{origin.stream}|{origin.position}",
            DLQ_SERVICE: service,
            DLQ_TIME: datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
    )
    return OutboundMessage(
        destination, origin.body, origin.key or "", headers, dead_letter=True, origin=origin
    )


@dataclass(frozen=True, slots=True)
class PublishLimits:
    """The largest message a bus takes, in bytes: body, key, all headers together, topic."""

    body: int
    key: int = MAX_KEY_BYTES
    headers: int = MAX_HEADER_BYTES
    topic: int = MAX_TOPIC_BYTES
    # The largest dead-letter body, where the bus takes more than `body` (RabbitMQ
    # parks the bytes it delivered whole); None: `body`. Never less than `body`.
    parked_body: int | None = None

    def body_limit(self, message: OutboundMessage) -> int:
        parked = self.parked_body
        return parked if message.dead_letter and parked is not None else self.body

    def refusal(self, message: OutboundMessage) -> str | None:
        """Why the bus can never take `message`; None when it fits."""
        if (size := len(message.body)) > (limit := self.body_limit(message)):
            return f"body is {size} bytes; the bus takes {limit}"
        if (size := _text_bytes(message.key)) > self.key:
            return f"key is {size} bytes; the bus takes {self.key}"
        if (size := header_bytes(message.headers)) > self.headers:
            return f"headers are {size} bytes; the bus takes {self.headers}"
        if not message.dead_letter and (size := _text_bytes(message.topic)) > self.topic:
            return f"topic name is {size} bytes; the bus takes {self.topic}"
        return None

    def refused(self, messages: Sequence[OutboundMessage]) -> dict[int, str]:
        """The index of each message the bus can never take, and why. Counted in
        characters first (at most 4 bytes each, no encoding): exactly only when that
        bound does not settle it, which for usual events it does."""
        found = {}
        body, key, headers, topic = self.body, self.key // 4, self.headers, self.topic // 4
        for index, message in enumerate(messages):
            copied = message.headers
            if (
                len(message.body) <= body  # a dead letter may be larger (`parked_body`)
                and len(message.key) <= key
                and len(message.topic) <= topic
                and (sum(map(len, copied)) + sum(map(len, copied.values()))) * 4 + 6 * len(copied)
                <= headers
            ):
                continue
            if (why := self.refusal(message)) is not None:
                found[index] = why
        return found

    def fit(self, dead_letter: OutboundMessage, body: int | None = None) -> OutboundMessage:
        """`dead_letter` cut to fit, its body to `body` bytes if given: body, key and the
        headers copied from the original are truncated; the reason headers are kept, and
        two more say the original body size and what was cut."""
        limit = self.body_limit(dead_letter)
        body = limit if body is None else min(body, limit)
        original = dict(dead_letter.headers)
        original.pop(DLQ_TRUNCATED, None)  # cut before (a dead letter parked again)
        own = {
            name: _cut_text(original.pop(name), MAX_PARKED_HEADER)
            for name in _PARKING_HEADERS
            if name in original
        }
        own.setdefault(DLQ_ORIGINAL_SIZE, str(len(dead_letter.body)))
        key = _cut_text(dead_letter.key, self.key)
        room = self.headers - header_bytes({**own, DLQ_TRUNCATED: "body,key,headers"})
        copied = {}
        for name, value in original.items():
            value = _cut_text(value, MAX_PARKED_HEADER)
            room -= header_bytes({name: value})
            if room < 0:
                break
            copied[name] = value
        whole = {
            "body": len(dead_letter.body) <= body,
            "key": key == dead_letter.key,
            "headers": copied == original,
        }
        cut = ",".join(part for part, kept in whole.items() if not kept) or "none"
        return OutboundMessage(
            dead_letter.topic,
            dead_letter.body[:body],
            key,
            {**copied, **own, DLQ_TRUNCATED: cut},
            dead_letter=True,
            origin=dead_letter.origin,
        )


_PARKING_HEADERS = (DLQ_REASON, DLQ_ERROR, DLQ_ORIGIN, DLQ_SERVICE, DLQ_TIME, DLQ_ORIGINAL_SIZE)


def header_bytes(headers: Mapping[str, str]) -> int:
    """Size of headers on the wire, near enough for limits (AMQP tables: 6 bytes each
    besides name and value; Kafka record headers take less)."""
    return sum(_text_bytes(name) + _text_bytes(value) + 6 for name, value in headers.items())


def _text_bytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())  # isascii is O(1)


def _cut_text(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, on a character boundary."""
    if _text_bytes(text) <= limit:
        return text
    return text.encode()[:limit].decode("utf-8", "ignore")


def text_headers(pairs: Sequence[tuple[str, bytes]]) -> dict[str, str]:
    """Binary broker headers as text; undecodable values are kept, escaped, not dropped."""
    return {name: value.decode("utf-8", "backslashreplace") for name, value in pairs}


def binary_headers(headers: Mapping[str, str]) -> list[tuple[str, bytes]]:
    return [(name, value.encode()) for name, value in headers.items()]


class Broker(ABC):
    """One consumer plus producer on a bus. All methods are safe to call from one task."""

    # OpenTelemetry's `messaging.system` for this bus.
    messaging_system: str = ""
    # True when each stream has one consumer at a time (Kafka partitions): the loop then
    # fences earlier owners in the state store. False for competing consumers (RabbitMQ).
    exclusive_streams: bool = False
    # Deliveries the bus hands out before some are acked (RabbitMQ's prefetch); None when
    # only the loop bounds them.
    max_unacked: int | None = None
    # What the bus takes (`publish` refuses more with Unpublishable); None: no bound.
    limits: PublishLimits | None = None
    # Where events no consumer is bound for are parked ("" where the bus keeps every event).
    unrouted_destination: str = ""
    # Set before `start`: consume every topic matching this too (the archiver). Kafka
    # subscribes by the pattern, RabbitMQ binds the queue to `#` on the events exchange.
    pattern: re.Pattern[str] | None = None

    @abstractmethod
    async def start(self, topics: Sequence[str], on_revoked: OnRevoked | None = None) -> None:
        """Connect and subscribe the consumer group to `topics` (event types). `on_revoked`
        is called with the streams this consumer gives up (a Kafka rebalance), once their
        in-flight work was drained."""

    @abstractmethod
    async def fetch_batch(
        self, max_messages: int, first_wait_s: float, fill_until: float
    ) -> list[InboundMessage]:
        """The loop's batch: wait at most `first_wait_s` for a first delivery, then until
        event-loop time `fill_until` for the batch to fill to `max_messages`."""

    @abstractmethod
    def dead_letter_destination(self, topic: str) -> str:
        """Where a message delivered from `topic` is parked: its dead letter's `topic`."""

    def dead_letter(self, record: DeadLetterRecord, service: str) -> OutboundMessage:
        """The message that parks `record` in its dead-letter destination."""
        destination = self.dead_letter_destination(record.message.topic)
        return dead_letter_message(record, destination, service)

    def span_attributes(self, message: InboundMessage) -> Mapping[str, Any]:
        """OpenTelemetry attributes of a delivery only this bus knows (Kafka: partition and
        offset)."""
        return NO_ATTRIBUTES

    @abstractmethod
    async def publish(self, messages: Sequence[OutboundMessage]) -> Sequence[OutboundMessage]:
        """Publish and return only when the bus confirmed every message, else raise
        BrokerUnavailable (transient: publish again) or Unpublishable (some messages can
        never be published). Returns the events no consumer was bound for, which the bus
        parked in `unrouted_destination` instead (RabbitMQ, the memory bus); usually none."""

    @abstractmethod
    async def ack(self, messages: Sequence[InboundMessage]) -> None:
        """Acknowledge deliveries (group commit). Never called before their reaction is durable."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect; deliveries not acked come back to the group as redeliveries."""

    async def lag(self) -> dict[str, int]:
        """Consumer lag per stream where the bus tells it: messages waiting to be handled.
        Empty when unknown. Raises BrokerUnavailable when the bus does not answer."""
        return {}


async def fill_batch(
    take: Callable[[int, float], Awaitable[list[InboundMessage]]],
    max_messages: int,
    first_wait_s: float,
    fill_until: float,
) -> list[InboundMessage]:
    """`Broker.fetch_batch` for a bus read by `take(max_messages, max_wait_s)`, which
    returns what is there, waiting at most `max_wait_s` for a first delivery."""
    batch = await take(max_messages, first_wait_s)
    if not batch:
        return batch
    clock = asyncio.get_running_loop().time
    while len(batch) < max_messages and (left := fill_until - clock()) > 0:
        batch += await take(max_messages - len(batch), left)
    return batch
