"""RabbitMQ helpers for the conformance suite (removed from Kafka services). Template-owned."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from typing import Any

import aio_pika
from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings import amqp as amqp_binding
from cloudevents.core.bindings import rabbitmq as rabbitmq_binding
from cloudevents.core.formats.json import JSONFormat

from {{ cookiecutter.package_name }}.runtime.brokers.rabbitmq import (
    RabbitMQBroker,
    RabbitMQSettings,
)
from {{ cookiecutter.package_name }}.runtime.config import Settings, load_model

# Reading stops once this says the parked messages seen so far are enough.
Enough = Callable[[list[tuple[bytes, dict[str, str]]]], bool]

ADDRESS_VARIABLE = "TEST_AMQP_URL"


def url_from_environment() -> str | None:
    return os.environ.get(ADDRESS_VARIABLE) or None


async def read_dead_letters(
    settings: Settings, topic: str, enough: Enough, deadline_s: float
) -> list[tuple[bytes, dict[str, str]]]:
    """RabbitMQ parks every topic's messages in the service's one dead-letter queue."""
    connection = await aio_pika.connect(settings.broker_url)
    parked: list[tuple[bytes, dict[str, str]]] = []
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(settings.dead_letter_queue, passive=True)
        async with asyncio.timeout(deadline_s):
            while not enough(parked):
                message = await queue.get(no_ack=True, fail=False)
                if message is None:
                    await asyncio.sleep(0.05)
                    continue
                headers = {name: str(value) for name, value in message.headers.items()}
                parked.append((message.body, headers))
    finally:
        await connection.close()
    return parked


async def remove_test_resources(url: str, used: Sequence[Settings]) -> None:
    """Delete the queues and the dead-letter and unrouted exchanges a test declared (each
    named after a consumer group of that test's own), so that a shared development broker does not
    collect them run after run. The shared topic exchange stays."""
    groups = {
        settings.consumer_group: (settings.dead_letter_queue, settings.unrouted_queue)
        for settings in used
    }
    if not groups:
        return
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        for queue, parking in groups.items():
            await channel.queue_delete(queue)
            for name in parking:
                await channel.queue_delete(name)
                await channel.exchange_delete(name)
    finally:
        await connection.close()


async def waiting_for(settings: Settings, topic: str) -> int:
    """Messages in the service's queue (its consumer took none of them)."""
    connection = await aio_pika.connect(settings.broker_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(settings.consumer_group, passive=True)
        return queue.declaration_result.message_count or 0
    finally:
        await connection.close()


async def drop_connection(broker: RabbitMQBroker) -> None:
    """Break the broker's connection as a network failure would; robust reconnect follows."""
    connection = broker._connection
    assert connection is not None and connection.transport is not None
    await connection.transport.connection.close(ConnectionError("dropped by a test"))


# (content type, headers, body) of an event as the official CloudEvents SDK renders it.
Wire = tuple[str | None, dict[str, Any], bytes]


def _amqp(event: BaseCloudEvent, structured: bool) -> Wire:
    """The AMQP binding: application properties are RabbitMQ's headers, the content-type
    property its content type."""
    convert = amqp_binding.to_structured if structured else amqp_binding.to_binary
    message = convert(event, JSONFormat())
    content_type = message.properties.get("content-type")
    return content_type, dict(message.application_properties), message.application_data


def _rabbitmq(event: BaseCloudEvent) -> Wire:
    """RabbitMQ's own binding (`ce-` headers)."""
    message = rabbitmq_binding.to_binary(event, JSONFormat())
    return message.content_type, dict(message.headers), message.body


SDK_MODES: dict[str, Callable[[BaseCloudEvent], Wire]] = {
    "amqp binary": lambda event: _amqp(event, structured=False),
    "amqp structured json": lambda event: _amqp(event, structured=True),
    "rabbitmq binary": _rabbitmq,
}


async def send_sdk_events(
    settings: Settings, topic: str, events: Sequence[tuple[str, BaseCloudEvent]]
) -> None:
    """Each (mode, event) as the SDK renders it, published with plain aio-pika to the
    service's topic exchange."""
    exchange_name = load_model(RabbitMQSettings).amqp_exchange
    connection = await aio_pika.connect(settings.broker_url)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(exchange_name)
        for mode, event in events:
            content_type, headers, body = SDK_MODES[mode](event)
            message = aio_pika.Message(body, headers=headers, content_type=content_type)
            await exchange.publish(message, routing_key=topic)
    finally:
        await connection.close()
