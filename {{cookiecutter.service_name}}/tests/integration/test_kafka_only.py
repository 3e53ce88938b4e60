"""Kafka-specific behaviour against a real broker (removed from RabbitMQ services)."""

from __future__ import annotations

import pytest
from aiokafka.partitioner import DefaultPartitioner

from {{ cookiecutter.package_name }} import SERVICE_NAME
from {{ cookiecutter.package_name }}.runtime.app import event_registry
from {{ cookiecutter.package_name }}.runtime.brokers.base import OutboundMessage
from {{ cookiecutter.package_name }}.runtime.config import ENV_PREFIX
from {{ cookiecutter.package_name }}.runtime.errors import ConfigError

from .conftest import Backend, fetch_at_least, run_cli
from .kafka_support import admin_client
from .test_conformance import INT_TYPE, publish, relay_one_event


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


async def test_records_beyond_one_batch_keep_their_order_per_key(real_backend: Backend) -> None:
    """A publish larger than the producer's batches goes out in several batches per
    partition; each key's records arrive in the order published, keyless ones too."""
    backend = real_backend
    settings = backend.settings()
    topic = settings.topic_for("batched")
    consumer = backend.broker(settings)
    await consumer.start([topic])
    keys = ["a", "b", ""]  # "": no key (a partition at random)
    sent = [
        OutboundMessage(topic, f"{n:05d}".encode() * 200, keys[n % 3])  # 1 kB each
        for n in range(1_500)  # 500 kB per key: two batches or more each
    ]
    await publish(backend, settings, sent)
    received = await fetch_at_least(consumer, len(sent))
    assert sorted(message.body for message in received) == sorted(m.body for m in sent)
    for key in ("a", "b"):
        arrived = [m.body for m in received if m.key == key]
        assert arrived == [m.body for m in sent if m.key == key]
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


async def partition_counts(url: str, topics: list[str]) -> dict[str, int]:
    async with admin_client(url) as admin:
        described = await admin.describe_topics(topics)
    return {topic["topic"]: len(topic["partitions"]) for topic in described}


async def test_topics_of_emitted_events_get_the_configured_partitions(
    real_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop's follow-up events and `emit`'s: their topics are created before the first
    publish with KAFKA_TOPIC_PARTITIONS, not left to the broker's auto-create."""
    monkeypatch.setenv(f"{ENV_PREFIX}KAFKA_TOPIC_PARTITIONS", "2")
    settings = real_backend.settings()
    await relay_one_event(real_backend, settings)
    event_type = event_registry().names()[0]
    emitted = run_cli(settings, "emit", event_type, "{}", KAFKA_TOPIC_PARTITIONS="2")
    assert emitted.returncode == 0, emitted.stderr

    created = [settings.topic_for(INT_TYPE), settings.topic_for(event_type)]
    assert await partition_counts(real_backend.url, created) == dict.fromkeys(created, 2)


async def test_without_topic_creation_a_missing_topic_is_one_line(
    real_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KAFKA_CREATE_TOPICS off: a consumed topic that does not exist stops the start, an
    emitted one fails `emit` (the loop waits for it, not ready), each in one line."""
    monkeypatch.setenv(f"{ENV_PREFIX}KAFKA_CREATE_TOPICS", "false")
    settings = real_backend.settings()
    topic = settings.topic_for("missing")
    with pytest.raises(ConfigError, match=f"KAFKA_CREATE_TOPICS is off: {topic}, {topic}.dlq"):
        await real_backend.broker(settings).start([topic])

    event_type = event_registry().names()[0]
    emitted = run_cli(settings, "emit", event_type, "{}", KAFKA_CREATE_TOPICS="false")
    assert emitted.returncode == 1
    assert emitted.stderr.strip().splitlines() == [
        f"{SERVICE_NAME}: error: not published: kafka: topic {settings.topic_for(event_type)} "
        "does not exist and KAFKA_CREATE_TOPICS is off"
    ]
