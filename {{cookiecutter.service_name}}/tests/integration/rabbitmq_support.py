"""RabbitMQ helpers for the conformance suite (removed from Kafka services). Template-owned."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence

import aio_pika

from {{ cookiecutter.package_name }}.runtime.brokers.rabbitmq import RabbitMQBroker
from {{ cookiecutter.package_name }}.runtime.config import Settings

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
