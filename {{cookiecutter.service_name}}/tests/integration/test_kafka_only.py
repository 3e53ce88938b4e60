"""Kafka-specific behaviour against a real broker (removed from RabbitMQ services)."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner

from {{ cookiecutter.package_name }}.runtime.brokers.base import OutboundMessage

from .conftest import Backend, fetch_at_least
from .kafka_support import admin_client
from .test_conformance import publish


async def test_keyed_messages_land_on_the_murmur2_partition(real_backend: Backend) -> None:
    backend = real_backend
    settings = backend.settings()
    topic = settings.topic_for("partitioned")
    consumer = backend.broker(settings)
    await consumer.start([topic])
    keys = [f"order-{n}" for n in range(30)]
    await publish(backend, settings, [OutboundMessage(topic, key.encode(), key) for key in keys])
    received = await fetch_at_least(consumer, len(keys))
    partitions = list(range(3))  # KAFKA_TOPIC_PARTITIONS default
    for message in received:
        assert message.key is not None
        expected = DefaultPartitioner()(message.key.encode(), partitions, partitions)
        assert message.stream == f"{topic}:{expected}"
    await consumer.ack(received)


async def topics_under(url: str, prefix: str) -> list[str]:
    async with admin_client(url) as admin:
        return sorted(topic for topic in await admin.list_topics() if topic.startswith(prefix))


async def test_a_test_leaves_no_topics_behind(real_backend: Backend) -> None:
    """What the fixture does after every test: the topics the test made are deleted."""
    settings = real_backend.settings()
    topic = settings.topic_for("left-behind")
    await real_backend.broker(settings).start([topic])
    made = [topic, settings.dead_letter_topic_for(topic)]
    assert await topics_under(real_backend.url, settings.topic_prefix) == sorted(made)
    await real_backend.close()
    assert await topics_under(real_backend.url, settings.topic_prefix) == []
