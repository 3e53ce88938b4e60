"""RabbitMQ-specific behaviour against a real broker (removed from Kafka services)."""

from __future__ import annotations

from {{ cookiecutter.package_name }}.runtime.brokers.base import OutboundMessage
from {{ cookiecutter.package_name }}.runtime.brokers.rabbitmq import RabbitMQBroker

from .conftest import Backend, fetch_at_least, fetch_for
from .test_conformance import publish


async def test_after_a_reconnect_old_deliveries_are_redelivered_never_acked(
    real_backend: Backend,
) -> None:
    backend = real_backend
    settings = backend.settings()
    topic = settings.topic_for("reconnect")
    consumer = backend.broker(settings)
    assert isinstance(consumer, RabbitMQBroker)
    await consumer.start([topic])
    await publish(backend, settings, [OutboundMessage(topic, b"m0"), OutboundMessage(topic, b"m1")])
    before = await fetch_at_least(consumer, 2)

    await consumer.drop_connection_for_tests()
    await consumer.ack(before)  # their tags died with the old channel: skipped, not sent

    again = await fetch_at_least(consumer, 2, deadline_s=60)
    assert sorted(m.body for m in again) == [b"m0", b"m1"]
    assert all(m.redelivered for m in again)
    await consumer.ack(again)
    assert await fetch_for(consumer, 1.0) == []
