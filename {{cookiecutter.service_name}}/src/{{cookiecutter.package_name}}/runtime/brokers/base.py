"""The broker interface every adapter implements, and what all adapters share."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

# Headers on dead-lettered messages (the body is the original bytes, unchanged).
DLQ_REASON = "x-dead-letter-reason"
DLQ_ERROR = "x-dead-letter-error"
DLQ_ORIGIN = "x-dead-letter-origin"
DLQ_SERVICE = "x-dead-letter-service"
MAX_ERROR_HEADER = 1024


NO_HEADERS: Mapping[str, str] = MappingProxyType({})  # shared by every message without any


class BrokerUnavailable(Exception):
    """The bus did not confirm a publish or an ack; the loop retries and does not ack."""


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
        }
    )
    return OutboundMessage(destination, origin.body, origin.key or "", headers, dead_letter=True)


def text_headers(pairs: Sequence[tuple[str, bytes]]) -> dict[str, str]:
    """Binary broker headers as text; undecodable values are kept, escaped, not dropped."""
    return {name: value.decode("utf-8", "backslashreplace") for name, value in pairs}


def binary_headers(headers: Mapping[str, str]) -> list[tuple[str, bytes]]:
    return [(name, value.encode()) for name, value in headers.items()]


class Broker(ABC):
    """One consumer plus producer on a bus. All methods are safe to call from one task.

    `on_streams_revoked`, when set (by the loop), is called with the streams this
    consumer just gave up (a Kafka rebalance), after their in-flight work was drained.
    """

    on_streams_revoked: Callable[[set[str]], None] | None = None
    # True when each stream has one consumer at a time (Kafka partitions): the loop then
    # fences earlier owners in the state store. False for competing consumers (RabbitMQ).
    exclusive_streams: bool = False
    # Deliveries the bus hands out before some are acked (RabbitMQ's prefetch); None when
    # only the loop bounds them.
    max_unacked: int | None = None

    @abstractmethod
    async def start(self, topics: Sequence[str]) -> None:
        """Connect and subscribe the consumer group to `topics` (event types)."""

    @abstractmethod
    async def fetch(self, max_messages: int, max_wait_s: float) -> list[InboundMessage]:
        """Up to `max_messages` deliveries, waiting at most `max_wait_s` for the first."""

    async def fetch_batch(
        self, max_messages: int, first_wait_s: float, fill_until: float
    ) -> list[InboundMessage]:
        """The loop's batch: wait at most `first_wait_s` for a first delivery, then until
        event-loop time `fill_until` for the batch to fill to `max_messages`. Built on
        `fetch`; a broker told of each delivery may instead wake once the batch is full
        (RabbitMQ)."""
        batch = await self.fetch(max_messages, first_wait_s)
        if not batch:
            return batch
        clock = asyncio.get_running_loop().time
        while len(batch) < max_messages and (left := fill_until - clock()) > 0:
            batch += await self.fetch(max_messages - len(batch), left)
        return batch

    @abstractmethod
    async def publish(self, messages: Sequence[OutboundMessage]) -> None:
        """Publish and return only when the bus confirmed every message (else raise)."""

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
