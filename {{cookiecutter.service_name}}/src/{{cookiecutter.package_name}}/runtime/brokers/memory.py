"""In-process bus with RabbitMQ-like semantics: ack, redelivery, dead-letter.

For tests and the demo only; not a production option.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..config import DEFAULT_DEAD_LETTER_TOPIC, dead_letter_topic
from .base import (
    Broker,
    BrokerUnavailable,
    InboundMessage,
    OnRevoked,
    OutboundMessage,
    PublishLimits,
    Unpublishable,
    fill_batch,
)


@dataclass(slots=True)
class _Queue:
    ready: deque[InboundMessage] = field(default_factory=deque)
    unacked: dict[int, InboundMessage] = field(default_factory=dict)
    waiter: asyncio.Event | None = None

    def wake(self) -> None:
        if self.waiter is not None:
            self.waiter.set()


class MemoryBus:
    """Topics fan out to the queues of the consumer groups bound to them."""

    def __init__(self) -> None:
        self.published: list[OutboundMessage] = []
        self.published_at: list[float] = []  # when each was published (time.time())
        # Operator reads (memory_reading): how far each named redrive got in `published`.
        self.redrive_progress: dict[str, int] = {}
        self._queues: dict[str, _Queue] = {}
        self._bindings: dict[str, set[str]] = {}
        self._patterns: dict[str, re.Pattern[str]] = {}  # group -> the topics it takes
        self._tags = itertools.count(1)
        self._publish_failures = 0

    def bind(
        self, group: str, topics: Sequence[str], pattern: re.Pattern[str] | None = None
    ) -> None:
        self._queues.setdefault(group, _Queue())
        for topic in topics:
            self._bindings.setdefault(topic, set()).add(group)
        if pattern is not None:
            self._patterns[group] = pattern

    def put(self, message: OutboundMessage) -> int:
        """Publish one message; returns to how many groups it was routed. Raises
        BrokerUnavailable while failures are injected."""
        if self._publish_failures:
            self._publish_failures -= 1
            raise BrokerUnavailable("memory bus: injected publish failure")
        self.published.append(message)
        self.published_at.append(time.time())
        groups = sorted(self._bindings.get(message.topic, ()))
        if self._patterns:
            topic = message.topic
            matching = {g for g, pattern in self._patterns.items() if pattern.match(topic)}
            groups = sorted(matching.union(groups))
        for group in groups:
            queue = self._queues[group]
            queue.ready.append(delivery(message, group, next(self._tags)))
            queue.wake()
        return len(groups)

    def fail_next_publishes(self, count: int) -> None:
        """Make the next `count` publishes fail, as a bus outage would."""
        self._publish_failures = count

    def messages(self, topic: str) -> list[OutboundMessage]:
        return [message for message in self.published if message.topic == topic]

    def queue(self, group: str) -> _Queue:
        return self._queues.setdefault(group, _Queue())

    def pending(self, group: str) -> int:
        """Messages of `group` not yet acked (ready or delivered)."""
        queue = self.queue(group)
        return len(queue.ready) + len(queue.unacked)


def delivery(message: OutboundMessage, stream: str, position: int) -> InboundMessage:
    """`message` as a consumer (or an operator's reader) gets it."""
    return InboundMessage(
        body=message.body,
        topic=message.topic,
        stream=stream,
        position=position,
        key=message.key or None,
        headers=dict(message.headers),
    )


_BUSES: dict[str, MemoryBus] = {}


def memory_limits(max_message_bytes: int) -> PublishLimits:
    """What the memory bus takes when it stands in for a real one: events up to
    MAX_MESSAGE_BYTES, with the key and headers any bus takes; dead letters whole."""
    return PublishLimits(body=max_message_bytes, parked_body=sys.maxsize)


def bus_for_url(url: str) -> MemoryBus:
    """`memory://` is the process-wide default bus; `memory://name` a named one."""
    name = urlsplit(url).netloc
    return _BUSES.setdefault(name, MemoryBus())


class MemoryBroker(Broker):
    messaging_system = "memory"
    # Events no group is bound for stay in the bus's `published` list, as all events do.
    unrouted_destination = "memory bus"

    def __init__(
        self,
        bus: MemoryBus,
        group: str,
        *,
        exclusive: bool = False,
        max_unacked: int | None = None,
        limits: PublishLimits | None = None,
        dead_letters: str = DEFAULT_DEAD_LETTER_TOPIC,
    ) -> None:
        """`exclusive=True` makes the group's queue behave like a Kafka partition with one
        owner (positions only grow, progress is checkpointed): for tests of that path.
        `max_unacked` stops deliveries while that many are unacked (RabbitMQ's prefetch).
        `limits` refuses larger messages as a real bus would (none by default).
        `dead_letters` names dead-letter topics as DEAD_LETTER_TOPIC does."""
        self.bus = bus
        self.group = group
        self.exclusive_streams = exclusive
        self.max_unacked = max_unacked
        self.limits = limits
        self.dead_letters = dead_letters
        self._delivered: dict[int, InboundMessage] = {}

    async def start(self, topics: Sequence[str], on_revoked: OnRevoked | None = None) -> None:
        # One consumer per group: nothing is ever revoked.
        self.bus.bind(self.group, topics, self.pattern)

    async def fetch_batch(
        self, max_messages: int, first_wait_s: float, fill_until: float
    ) -> list[InboundMessage]:
        return await fill_batch(self._take, max_messages, first_wait_s, fill_until)

    def dead_letter_destination(self, topic: str) -> str:
        return dead_letter_topic(self.dead_letters, topic, self.group)

    async def _take(self, max_messages: int, max_wait_s: float) -> list[InboundMessage]:
        queue = self.bus.queue(self.group)
        if not (queue.ready and self._room()) and max_wait_s > 0:
            queue.waiter = asyncio.Event()  # woken by a publish, or an ack that makes room
            try:
                await asyncio.wait_for(queue.waiter.wait(), max_wait_s)
            except TimeoutError:
                pass
            finally:
                queue.waiter = None
        batch: list[InboundMessage] = []
        max_messages = min(max_messages, self._room())
        while queue.ready and len(batch) < max_messages:
            message = queue.ready.popleft()
            queue.unacked[message.position] = message
            self._delivered[message.position] = message
            batch.append(message)
        return batch

    def _room(self) -> int:
        """Deliveries allowed before more are acked."""
        if self.max_unacked is None:
            return sys.maxsize
        return max(0, self.max_unacked - len(self._delivered))

    async def publish(self, messages: Sequence[OutboundMessage]) -> Sequence[OutboundMessage]:
        if self.limits is not None and (refused := self.limits.refused(messages)):
            raise Unpublishable(refused)
        return [m for m in messages if not self.bus.put(m) and not m.dead_letter]

    async def ack(self, messages: Sequence[InboundMessage]) -> None:
        queue = self.bus.queue(self.group)
        for message in messages:
            if self._delivered.pop(message.position, None) is None:
                raise ValueError(f"ack of unknown delivery {message.position}")
            del queue.unacked[message.position]
        if self.max_unacked is not None:
            queue.wake()

    async def lag(self) -> dict[str, int]:
        return {self.group: len(self.bus.queue(self.group).ready)}

    async def close(self) -> None:
        """Unacked deliveries go back to the front of the queue, marked redelivered."""
        queue = self.bus.queue(self.group)
        returned = sorted(self._delivered.values(), key=lambda message: message.position)
        for message in reversed(returned):
            del queue.unacked[message.position]
            message.redelivered = True
            queue.ready.appendleft(message)
        self._delivered.clear()
        if returned:
            queue.wake()
