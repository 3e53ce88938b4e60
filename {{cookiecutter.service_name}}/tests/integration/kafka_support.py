"""Kafka helpers for the conformance suite (removed from RabbitMQ services). Template-owned."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings import kafka as kafka_binding
from cloudevents.core.formats.json import JSONFormat

from {{ cookiecutter.package_name }}.runtime.brokers.base import text_headers
from {{ cookiecutter.package_name }}.runtime.brokers.kafka import bootstrap_servers
from {{ cookiecutter.package_name }}.runtime.config import Settings

# Reading stops once this says the parked messages seen so far are enough.
Enough = Callable[[list[tuple[bytes, dict[str, str]]]], bool]

ADDRESS_VARIABLE = "TEST_KAFKA_BOOTSTRAP"


def url_from_environment() -> str | None:
    address = os.environ.get(ADDRESS_VARIABLE)
    return f"kafka://{address}" if address else None


async def read_dead_letters(
    settings: Settings, topic: str, enough: Enough, deadline_s: float
) -> list[tuple[bytes, dict[str, str]]]:
    consumer = AIOKafkaConsumer(
        settings.dead_letter_topic_for(topic),
        bootstrap_servers=bootstrap_servers(settings.broker_url),
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    parked: list[tuple[bytes, dict[str, str]]] = []
    try:
        async with asyncio.timeout(deadline_s):
            while not enough(parked):
                records = await consumer.getmany(timeout_ms=200)
                for messages in records.values():
                    parked += [(m.value or b"", text_headers(m.headers)) for m in messages]
    finally:
        await consumer.stop()
    return parked


async def remove_test_resources(url: str, used: Sequence[Settings]) -> None:
    """Delete the topics a test made (each test has a topic prefix of its own), so that a
    shared development cluster does not collect them run after run."""
    prefixes = tuple({settings.topic_prefix for settings in used if settings.topic_prefix})
    if not prefixes:
        return
    async with admin_client(url) as admin:
        made = [topic for topic in await admin.list_topics() if topic.startswith(prefixes)]
        if made:
            await admin.delete_topics(made)


@contextlib.asynccontextmanager
async def admin_client(url: str) -> AsyncIterator[AIOKafkaAdminClient]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers(url))
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


async def waiting_for(settings: Settings, topic: str) -> int:
    """Messages of `topic` the service's consumer group has not consumed (committed)."""
    # Asked as the group (not joining it): an admin's offset listing is not what every
    # Kafka-protocol broker answers.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers(settings.broker_url),
        group_id=settings.consumer_group,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        await consumer.topics()  # the cluster's metadata, this topic's partitions among it
        partitions = [TopicPartition(topic, n) for n in consumer.partitions_for_topic(topic) or ()]
        committed = {p: await consumer.committed(p) or 0 for p in partitions}
        consumer.assign(partitions)
        for partition, offset in committed.items():
            consumer.seek(partition, offset)
        # The end as a fetch tells it (a list-offsets answer is not right on every broker).
        async with asyncio.timeout(30):
            while any(consumer.highwater(p) is None for p in partitions):
                await consumer.getmany(timeout_ms=100)
        return sum((consumer.highwater(p) or 0) - committed[p] for p in partitions)
    finally:
        await consumer.stop()


# How the official CloudEvents SDK puts an event on Kafka (its Kafka protocol binding).
SDK_MODES = {
    "kafka binary": kafka_binding.to_binary,
    "kafka structured json": kafka_binding.to_structured,
}


async def send_sdk_events(
    settings: Settings, topic: str, events: Sequence[tuple[str, BaseCloudEvent]]
) -> None:
    """Each (mode, event) as the SDK renders it, sent with a plain Kafka producer."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers(settings.broker_url))
    await producer.start()
    try:
        for mode, event in events:
            record = SDK_MODES[mode](event, JSONFormat())
            key = record.key.encode() if isinstance(record.key, str) else record.key
            await producer.send_and_wait(
                topic, record.value, key=key, headers=list(record.headers.items())
            )
    finally:
        await producer.stop()
