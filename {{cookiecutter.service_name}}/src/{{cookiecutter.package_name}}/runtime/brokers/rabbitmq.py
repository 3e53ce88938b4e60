"""RabbitMQ adapter (aio-pika): topic exchange routed by event type, durable quorum queue,
dead-letter exchange, publisher confirms, prefetch, multiple-ack, robust reconnect.

After a reconnect the delivery tags of the old channel are void: such messages are never
acked (RabbitMQ redelivers them, flagged redelivered, and dedupe drops what was handled).

Events are published `mandatory`: one that no queue is bound for comes back (before its
confirm) and is parked in this service's `<CONSUMER_GROUP>.unrouted` quorum queue, so it
is not lost. (Not an alternate exchange on the topic exchange: every service of every
template version declares that exchange, and RabbitMQ refuses a declaration whose
arguments differ from the existing exchange's, so adding one would stop the others.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from aiormq.abc import ConfirmationFrameType, DeliveredMessage
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..config import ENV_PREFIX, Settings, load_model
from ..logs import get_logger
from .base import (
    CONTENT_TYPE_HEADER,
    MAX_HEADER_BYTES,
    MAX_KEY_BYTES,
    NO_HEADERS,
    Broker,
    BrokerUnavailable,
    InboundMessage,
    OnRevoked,
    OutboundMessage,
    PublishLimits,
    Unpublishable,
)
from .tls import tls_context

PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)  # written to disk by the broker
# What publishing one message with confirms and `mandatory` comes to: the confirm, or the
# message itself when the broker returned it (routed nowhere). None without confirms.
PublishResult = ConfirmationFrameType | DeliveredMessage | None

log = get_logger(component="rabbitmq")
KEY_HEADER = "x-event-key"
# A lost, refused or unresolvable connection (OSError covers DNS failures too).
TRANSIENT = (AMQPError, ChannelInvalidStateError, OSError, TimeoutError)
# A message's properties and headers travel in one frame (FRAME_MAX, 128 KiB by default;
# a larger one makes the broker close the connection): room kept for the properties
# besides the headers (content type, message id, delivery mode, frame header).
PROPERTIES_BYTES = 1024
ROUTING_KEY_BYTES = 255
# The largest body every supported RabbitMQ takes by default (max_message_size; 4.x
# lowered it from 128 MiB): dead letters are parked whole up to this.
BROKER_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class RabbitMQSettings(BaseSettings):
    """RabbitMQ-only settings; the same prefix as every other variable."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    amqp_exchange: str = Field("events", description="Topic exchange every service publishes to")
    amqp_delivery_limit: int = Field(
        20, gt=0, description="Deliveries before the quorum queue dead-letters a message"
    )
    amqp_prefetch_batches: int = Field(2, gt=0, description="Prefetch = this x BATCH_SIZE")
    amqp_reconnect_interval_s: float = Field(2.0, gt=0, description="Wait between reconnects")


class RabbitMQBroker(Broker):
    messaging_system = "rabbitmq"

    def __init__(self, settings: Settings, rabbit: RabbitMQSettings) -> None:
        self.settings = settings
        self.rabbit = rabbit
        self.max_unacked: int = settings.batch_size * rabbit.amqp_prefetch_batches
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._dead_letters: AbstractExchange | None = None
        self._unrouted: AbstractExchange | None = None
        self.unrouted_destination = f"queue {settings.unrouted_queue}"
        # Deliveries not fetched yet; a fetch waiting for `_wanted` of them waits on `_waiter`.
        self._buffer: list[AbstractIncomingMessage] = []
        self._wanted = 0
        self._waiter: asyncio.Future[None] | None = None
        self._consuming = False
        # Lag checks use their own channel: a failed passive declare closes its channel.
        self._lag_channel: AbstractRobustChannel | None = None

    async def start(self, topics: Sequence[str], on_revoked: OnRevoked | None = None) -> None:
        """Competing consumers share the queue: nothing is ever revoked."""
        settings = self.settings
        tls = tls_context(settings, required=settings.broker_url.startswith("amqps:"))
        try:
            with self._unavailable_on_outage("connect"):
                await self._connect_and_subscribe(topics, tls)
        except BrokerUnavailable:
            await self.close()
            raise

    async def _connect_and_subscribe(self, topics: Sequence[str], tls: Any) -> None:
        settings = self.settings
        self._connection = await aio_pika.connect_robust(
            settings.broker_url,
            ssl_context=tls,
            client_properties={"connection_name": settings.consumer_group},
            reconnect_interval=self.rabbit.amqp_reconnect_interval_s,
        )
        self._connection.reconnect_callbacks.add(self._on_reconnect)
        channel = await self._connection.channel(publisher_confirms=True)
        self._channel = channel
        await channel.set_qos(prefetch_count=self.max_unacked)
        self._exchange = await channel.declare_exchange(
            self.rabbit.amqp_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        self._dead_letters, self._unrouted = await self._declare_parking(channel)
        self.limits = self._limits()
        if self.pattern is not None:
            topics = ["#"]  # the archiver: every event published to the exchange
        if topics:
            await self._consume(channel, topics)

    @contextlib.contextmanager
    def _unavailable_on_outage(self, what: str) -> Iterator[None]:
        """aio-pika's errors of a lost connection as BrokerUnavailable. While a robust
        connection reconnects it has no transport, and using it raises RuntimeError
        ("Connection was not opened"): an outage too, not a bug."""
        try:
            yield
        except TRANSIENT as error:
            raise BrokerUnavailable(f"rabbitmq {what}: {error!r}") from error
        except RuntimeError as error:
            if self._connection is not None and self._connection.transport is not None:
                raise
            raise BrokerUnavailable(f"rabbitmq {what}: {error}") from error

    async def _declare_parking(
        self, channel: AbstractChannel
    ) -> tuple[AbstractExchange, AbstractExchange]:
        """The dead-letter and the unrouted exchange, each into its quorum queue."""
        found = []
        for name in (self.settings.dead_letter_queue, self.settings.unrouted_queue):
            exchange = await channel.declare_exchange(
                name, aio_pika.ExchangeType.FANOUT, durable=True
            )
            queue = await channel.declare_queue(
                name, durable=True, arguments={"x-queue-type": "quorum"}
            )
            await queue.bind(exchange)
            found.append(exchange)
        return found[0], found[1]

    def _limits(self) -> PublishLimits:
        """What this connection can publish: MAX_MESSAGE_BYTES of body for events (dead
        letters whole), headers and key within one frame, routing keys of 255 bytes."""
        frame_max = 131_072
        if self._connection is not None and self._connection.transport is not None:
            frame_max = self._connection.transport.connection.connection_tune.frame_max
        room = frame_max - PROPERTIES_BYTES  # for the headers, the key header among them
        key = min(MAX_KEY_BYTES, room // 4)
        return PublishLimits(
            body=self.settings.max_message_bytes,
            key=key,
            headers=min(MAX_HEADER_BYTES, room - key),
            topic=ROUTING_KEY_BYTES,
            parked_body=max(BROKER_MAX_MESSAGE_BYTES, self.settings.max_message_bytes),
        )

    async def _consume(self, channel: AbstractChannel, topics: Sequence[str]) -> None:
        queue = await channel.declare_queue(
            self.settings.consumer_group,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                # Poison that kills the process before it can be acked still ends up parked.
                "x-dead-letter-exchange": self.settings.dead_letter_queue,
                "x-delivery-limit": self.rabbit.amqp_delivery_limit,
            },
        )
        assert self._exchange is not None
        for topic in topics:
            await queue.bind(self._exchange, routing_key=topic)
        await queue.consume(self._on_message, no_ack=False)
        self._consuming = True

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._buffer.append(message)
        waiter = self._waiter
        if waiter is not None and len(self._buffer) >= self._wanted and not waiter.done():
            waiter.set_result(None)

    def _on_reconnect(self, *_: Any) -> None:
        # Old deliveries come back as redeliveries; the new channel's may already be here.
        live = [delivery for delivery in self._buffer if _channel_open(delivery)]
        stale = len(self._buffer) - len(live)
        self._buffer[:] = live
        log.warning("reconnected; dropped deliveries of the old channel", dropped=stale)

    async def _buffered(self, count: int, within_s: float) -> bool:
        """Wait until `count` deliveries are buffered, at most `within_s`; True if they are."""
        if len(self._buffer) < count and within_s > 0:
            self._wanted = count
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(within_s):
                    await self._waiter
            except TimeoutError:
                pass
            finally:
                self._waiter = None
        return len(self._buffer) >= count

    async def fetch_batch(
        self, max_messages: int, first_wait_s: float, fill_until: float
    ) -> list[InboundMessage]:
        """Wakes once when the batch is full (or `fill_until` came), not at every delivery."""
        if not await self._buffered(1, first_wait_s):
            return []
        await self._buffered(max_messages, fill_until - asyncio.get_running_loop().time())
        return self._take(max_messages)

    def dead_letter_destination(self, topic: str) -> str:
        """Every topic's dead letters go to the service's dead-letter exchange."""
        return self.settings.dead_letter_queue

    def _take(self, max_messages: int) -> list[InboundMessage]:
        """Up to `max_messages` buffered deliveries, of an open channel only."""
        deliveries = self._buffer[:max_messages]
        del self._buffer[:max_messages]
        if not deliveries:
            return []
        # Deliveries come in channel order: the first one's channel open means all are.
        if not _channel_open(deliveries[0]):
            deliveries = [delivery for delivery in deliveries if _channel_open(delivery)]
        return inbound_messages(deliveries, self.settings.consumer_group)

    async def publish(self, messages: Sequence[OutboundMessage]) -> Sequence[OutboundMessage]:
        exchange, dead_letters = self._exchange, self._dead_letters
        if exchange is None or dead_letters is None or self.limits is None:
            raise BrokerUnavailable("rabbitmq: not connected")
        if refused := self.limits.refused(messages):
            raise Unpublishable(refused)  # nothing sent: a frame too large ends the connection
        routed = [
            (dead_letters.name, "", message)
            if message.dead_letter
            else (exchange.name, message.topic, message)
            for message in messages
        ]
        with self._unavailable_on_outage("publish"):
            # Each returns when the broker confirmed it, or returned it (routed nowhere).
            results = await self._publish_each(routed)
            returned = [
                message
                for message, result in zip(messages, results, strict=True)
                if isinstance(result, DeliveredMessage)
            ]
            if returned:
                await self._park_unrouted(returned)
        return returned

    async def _park_unrouted(self, returned: Sequence[OutboundMessage]) -> None:
        """Events no queue is bound for go to the unrouted queue (their routing key kept),
        confirmed before the loop acks what emitted them."""
        assert self._unrouted is not None
        results: Sequence[PublishResult] = []
        if not any(message.dead_letter for message in returned):
            unrouted = self._unrouted.name
            results = await self._publish_each(
                [(unrouted, message.topic, message) for message in returned]
            )
        if len(results) < len(returned) or any(isinstance(r, DeliveredMessage) for r in results):
            # A parking queue was deleted under us: declare it again, then publish again.
            assert self._channel is not None
            self._dead_letters, self._unrouted = await self._declare_parking(self._channel)
            raise BrokerUnavailable("rabbitmq: a parking queue was gone; declared it again")

    async def _publish_each(
        self, routed: Sequence[tuple[str, str, OutboundMessage]]
    ) -> Sequence[PublishResult]:
        """Publish each (exchange, routing key, message) with publisher confirms and
        `mandatory`; each result is the confirm, or the message the broker returned. Through
        the channel's AMQP layer (aiormq) itself: aio-pika's Message and Exchange.publish
        add about a sixth to the cost of each message, and nothing these need."""
        if self._channel is None or self._channel.is_closed:
            # Reconnecting: fail now (the loop retries and reports it), rather than wait in
            # get_underlay_channel until the connection is back.
            raise BrokerUnavailable("rabbitmq publish: the channel is closed (reconnecting)")
        channel = await self._channel.get_underlay_channel()
        return await asyncio.gather(
            *(
                channel.basic_publish(
                    message.body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=_properties(message),
                    mandatory=True,
                )
                for exchange, routing_key, message in routed
            )
        )

    async def ack(self, messages: Sequence[InboundMessage]) -> None:
        if not messages:
            return
        live = list(messages)
        # The first delivery's channel still open means no reconnect since: one channel.
        if not _channel_open(messages[0].handle):
            live = [m for m in messages if _channel_open(m.handle)]
            log.warning(
                "not acking deliveries of a closed channel", count=len(messages) - len(live)
            )
            if not live:
                return
        # Deliveries arrive in tag order and batches are acked whole, so every tag up to
        # the highest of this batch belongs to it (or was acked before): one multiple-ack.
        last = max(live, key=lambda message: message.position)
        try:
            await last.handle.ack(multiple=True)
        except TRANSIENT as error:
            log.warning(
                "ack lost with the channel; messages will be redelivered", error=repr(error)
            )

    async def lag(self) -> dict[str, int]:
        """Messages ready in the queue plus those prefetched and not yet fetched by the loop
        (deliveries being handled are not counted)."""
        if self._connection is None or not self._consuming:
            return {}
        try:
            with self._unavailable_on_outage("lag"):
                if self._lag_channel is None or self._lag_channel.is_closed:
                    self._lag_channel = await self._connection.channel()
                queue = await self._lag_channel.declare_queue(
                    self.settings.consumer_group, passive=True, robust=False
                )
        except BrokerUnavailable:
            self._lag_channel = None
            raise
        ready = queue.declaration_result.message_count or 0
        return {self.settings.consumer_group: ready + len(self._buffer)}

    async def open_channel(self) -> AbstractChannel:
        """A channel of its own on this connection (operator reads: a private queue, or
        parked messages held unacked until they are settled)."""
        if self._connection is None:
            raise BrokerUnavailable("rabbitmq: not connected")
        try:
            return await self._connection.channel()
        except TRANSIENT as error:
            raise BrokerUnavailable(f"rabbitmq: {error!r}") from error

    async def close(self) -> None:
        if self._connection is not None:
            try:  # unacked deliveries return to the queue
                with self._unavailable_on_outage("close"):
                    await self._connection.close()
            except BrokerUnavailable as error:
                log.warning("connection lost before it was closed", error=str(error))
            self._connection = None
        self._channel = self._exchange = self._dead_letters = self._unrouted = None
        self._lag_channel = None
        self._consuming = False


def inbound_messages(
    deliveries: Sequence[AbstractIncomingMessage], stream: str
) -> list[InboundMessage]:
    """Deliveries as the loop (or an operator's read) gets them: headers as text, the
    content-type property as the CloudEvents header, the key from its header."""
    batch = []
    for delivery in deliveries:
        headers = delivery.headers
        text = (
            {name: found for name, value in headers.items() if (found := _text(value)) is not None}
            if headers
            else {}
        )
        if delivery.content_type:  # CloudEvents AMQP binding: the content-type property
            text[CONTENT_TYPE_HEADER] = delivery.content_type
        batch.append(
            InboundMessage(
                delivery.body,
                delivery.routing_key or "",
                stream,
                delivery.delivery_tag or 0,
                text.get(KEY_HEADER),
                text or NO_HEADERS,
                bool(delivery.redelivered),
                delivery,
            )
        )
    return batch


def _properties(message: OutboundMessage) -> aiormq.spec.Basic.Properties:
    headers: dict[str, Any] = dict(message.headers)
    # CloudEvents AMQP binding: the content type is the message's property, not a header.
    content_type = headers.pop(CONTENT_TYPE_HEADER, None)
    if message.key:
        headers[KEY_HEADER] = message.key
    return aiormq.spec.Basic.Properties(
        headers=headers, delivery_mode=PERSISTENT, content_type=content_type
    )


def _channel_open(delivery: AbstractIncomingMessage) -> bool:
    try:
        delivery.channel  # noqa: B018 - raises once the delivery's channel is closed
    except ChannelInvalidStateError:
        return False
    return True


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def open_broker(settings: Settings) -> Broker:
    return RabbitMQBroker(settings, load_model(RabbitMQSettings))
