"""Operator reads on RabbitMQ, on a channel of their own: a tail is a private queue
(exclusive, auto-delete: gone with the connection) bound to the chosen types, so the
service's queue never sees it. Parked messages are browsed with basic.get, held unacked
(each read once, within a bound) and returned to the queue when the reader closes; a
redrive acks one only after its re-publish was confirmed. A queue keeps no history: a
read can only start now."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from ..config import Settings
from .base import BrokerUnavailable
from .rabbitmq import TRANSIENT, RabbitMQBroker, inbound_messages
from .reading import BusReader, Reading, Record, Start, no_history

POLL_S = 0.2  # a tail looks at `until` this often
TAIL_STREAM = "tail"


class RabbitMQReader(BusReader):
    keeps_history = False
    broker: RabbitMQBroker

    def __init__(self, settings: Settings, broker: RabbitMQBroker) -> None:
        super().__init__(settings, broker)
        self._channel: AbstractChannel | None = None
        self._held: dict[int, AbstractIncomingMessage] = {}  # parked, read, not settled

    async def close(self) -> None:
        try:
            if self._held and self._channel is not None and not self._channel.is_closed:
                # nack with requeue (not reject, not a closed channel): RabbitMQ 4.3+ does
                # not count it as a failed delivery towards a quorum queue's delivery limit.
                last = self._held[max(self._held)]
                await last.nack(multiple=True, requeue=True)
            if self._channel is not None:
                await self._channel.close()
        except TRANSIENT:
            pass  # the connection is gone: what was held returns to the queue anyway
        finally:
            self._held.clear()
            self._channel = None
            await super().close()

    async def read(
        self, event_types: Sequence[str], start: Start, until: datetime | None, *, follow: bool
    ) -> Reading:
        if start != "end" or not follow:
            raise no_history("reading events from the past")
        channel = await self._own_channel()
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

        async def arrived(delivery: AbstractIncomingMessage) -> None:
            inbox.put_nowait(delivery)

        try:
            exchange = await channel.declare_exchange(
                self.broker.rabbit.amqp_exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            for event_type in event_types:
                await queue.bind(exchange, routing_key=self.settings.topic_for(event_type))
            await queue.consume(arrived, no_ack=True)
        except TRANSIENT as error:
            raise BrokerUnavailable(f"rabbitmq: {error!r}") from error
        return Reading(_follow(inbox, until))

    async def parked(
        self, event_types: Sequence[str], resume: str | None = None, bound: int | None = None
    ) -> Reading:
        channel = await self._own_channel()
        try:
            queue = await channel.declare_queue(self.settings.dead_letter_queue, passive=True)
        except TRANSIENT as error:
            raise BrokerUnavailable(f"rabbitmq: {error!r}") from error
        waiting = queue.declaration_result.message_count or 0
        total = waiting if bound is None else min(waiting, bound)
        return Reading(self._get(queue, bound), total)

    async def settle(self, read: Sequence[Record], redriven: Sequence[Record]) -> None:
        try:
            for record in redriven:
                delivery = self._held.pop(record.message.position)
                await delivery.ack()
        except TRANSIENT as error:
            # Not acked: still parked, and re-published; a redrive run again re-publishes
            # it with the same generation, which the service drops as a duplicate.
            raise BrokerUnavailable(f"rabbitmq ack failed: {error!r}") from error

    async def _own_channel(self) -> AbstractChannel:
        if self._channel is None:
            self._channel = await self.broker.open_channel()
        return self._channel

    async def _get(self, queue: AbstractQueue, bound: int | None) -> AsyncIterator[Record]:
        stream, count = self.settings.dead_letter_queue, 0
        while bound is None or count < bound:
            try:
                delivery = await queue.get(no_ack=False, fail=False)
            except TRANSIENT as error:
                raise BrokerUnavailable(f"rabbitmq: {error!r}") from error
            if delivery is None:
                return  # read them all
            [message] = inbound_messages([delivery], stream)
            self._held[message.position] = delivery
            count += 1
            yield Record(message)


async def _follow(
    inbox: asyncio.Queue[AbstractIncomingMessage], until: datetime | None
) -> AsyncIterator[Record]:
    while until is None or datetime.now(UTC) < until:
        try:
            delivery = await asyncio.wait_for(inbox.get(), POLL_S)
        except TimeoutError:
            continue
        [message] = inbound_messages([delivery], TAIL_STREAM)
        yield Record(message, datetime.now(UTC))
