"""RabbitMQ-specific behaviour against a real broker (removed from Kafka services).

The TLS tests use the broker's amqps listener, which requires client certificates:
TEST_AMQPS_URL with TEST_AMQPS_CA_FILE, TEST_AMQPS_CERT_FILE and TEST_AMQPS_KEY_FILE
(scripts/servers.sh in the template sets them; under CI=true they must be set).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelNotFoundEntity

from {{ cookiecutter.package_name }}.runtime.app import event_registry
from {{ cookiecutter.package_name }}.runtime.brokers.base import (
    CONTENT_TYPE_HEADER,
    BrokerUnavailable,
    OutboundMessage,
)
from {{ cookiecutter.package_name }}.runtime.brokers.rabbitmq import RabbitMQBroker
from {{ cookiecutter.package_name }}.runtime.envelope import CONTENT_TYPE
from {{ cookiecutter.package_name }}.runtime.errors import ConfigError

from .conftest import Backend, fetch_at_least, fetch_for, run_cli, unavailable
from .rabbitmq_support import drop_connection
from .test_conformance import INT_TYPE, publish, relay_one_event
from .tls_support import make_certificates

TLS_VARIABLES = (
    "TEST_AMQPS_URL",
    "TEST_AMQPS_CA_FILE",
    "TEST_AMQPS_CERT_FILE",
    "TEST_AMQPS_KEY_FILE",
)


@pytest.fixture
def amqps() -> dict[str, str]:
    missing = [name for name in TLS_VARIABLES if not os.environ.get(name)]
    if missing:
        unavailable(", ".join(missing), "set them to test RabbitMQ over TLS")
    return {name: os.environ[name] for name in TLS_VARIABLES}


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

    await drop_connection(consumer)
    await consumer.ack(before)  # their tags died with the old channel: skipped, not sent

    again = await fetch_at_least(consumer, 2, deadline_s=60)
    assert sorted(m.body for m in again) == [b"m0", b"m1"]
    assert all(m.redelivered for m in again)
    await consumer.ack(again)
    assert await fetch_for(consumer, 1.0) == []


async def test_amqps_with_a_client_certificate_round_trips(
    real_backend: Backend, amqps: dict[str, str]
) -> None:
    settings = real_backend.settings(
        broker_url=amqps["TEST_AMQPS_URL"],
        broker_tls_ca_file=Path(amqps["TEST_AMQPS_CA_FILE"]),
        broker_tls_cert_file=Path(amqps["TEST_AMQPS_CERT_FILE"]),
        broker_tls_key_file=Path(amqps["TEST_AMQPS_KEY_FILE"]),
    )
    topic = settings.topic_for("over-tls")
    consumer = real_backend.broker(settings)
    await consumer.start([topic])
    await publish(real_backend, settings, [OutboundMessage(topic, b"encrypted")])
    [message] = await fetch_at_least(consumer, 1)
    assert message.body == b"encrypted"
    await consumer.ack([message])


async def test_amqps_refuses_a_server_the_configured_ca_did_not_sign(
    real_backend: Backend, amqps: dict[str, str], tmp_path: Path
) -> None:
    other = make_certificates(tmp_path / "other", "other")
    settings = real_backend.settings(
        broker_url=amqps["TEST_AMQPS_URL"],
        broker_tls_ca_file=other["ca"],
        broker_tls_cert_file=Path(amqps["TEST_AMQPS_CERT_FILE"]),
        broker_tls_key_file=Path(amqps["TEST_AMQPS_KEY_FILE"]),
    )
    with pytest.raises(BrokerUnavailable) as refused:
        await real_backend.broker(settings).start([])
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)
    assert "\n" not in str(refused.value)


async def test_amqps_without_a_client_certificate_is_refused_by_the_server(
    real_backend: Backend, amqps: dict[str, str]
) -> None:
    settings = real_backend.settings(
        broker_url=amqps["TEST_AMQPS_URL"], broker_tls_ca_file=Path(amqps["TEST_AMQPS_CA_FILE"])
    )
    with pytest.raises(BrokerUnavailable):
        await real_backend.broker(settings).start([])


async def test_unreadable_tls_files_are_a_one_line_config_error(
    real_backend: Backend, amqps: dict[str, str]
) -> None:
    settings = real_backend.settings(
        broker_url=amqps["TEST_AMQPS_URL"], broker_tls_ca_file=Path("/nonexistent/ca.pem")
    )
    with pytest.raises(ConfigError, match=r"BROKER_TLS_CA_FILE: no such file /nonexistent/ca\.pem"):
        await real_backend.broker(settings).start([])


async def existing_queues(url: str, names: list[str]) -> list[str]:
    connection = await aio_pika.connect(url)
    found = []
    try:
        for name in names:
            channel = await connection.channel()  # a missing queue closes its channel
            try:
                await channel.declare_queue(name, passive=True)
                found.append(name)
            except ChannelNotFoundEntity:
                pass
    finally:
        await connection.close()
    return found


async def test_a_test_leaves_no_queues_behind(real_backend: Backend) -> None:
    """What the fixture does after every test: the queues the test declared are deleted."""
    settings = real_backend.settings()
    await real_backend.broker(settings).start([settings.topic_for("left-behind")])
    made = [settings.consumer_group, settings.dead_letter_queue, settings.unrouted_queue]
    assert await existing_queues(real_backend.url, made) == made
    await real_backend.close()
    assert await existing_queues(real_backend.url, made) == []


async def queued(url: str, queue: str, count: int) -> list[AbstractIncomingMessage]:
    """The first `count` messages in `queue`, left in it (read, then requeued)."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        found: list[AbstractIncomingMessage] = []
        for _ in range(count):
            message = await declared.get(no_ack=False, fail=False)
            assert message is not None, f"{queue} holds {len(found)} messages, not {count}"
            found.append(message)
        for message in found:
            await message.nack(requeue=True)
    finally:
        await connection.close()
    return found


async def test_events_no_queue_is_bound_for_are_parked_in_the_unrouted_queue(
    real_backend: Backend,
) -> None:
    """Nothing consumes Int64Value: the loop's follow-up event and `emit`'s event end up
    in the service's unrouted quorum queue, counted, and the source is acked only once
    its event is there."""
    settings = real_backend.settings()
    loop = await relay_one_event(real_backend, settings)
    assert loop.stats.unrouted == 1  # counted once its source was acked
    [parked] = await queued(real_backend.url, settings.unrouted_queue, 1)
    assert parked.routing_key == settings.topic_for(INT_TYPE)  # kept for a later redrive
    assert parked.content_type == CONTENT_TYPE

    event_type = event_registry().names()[0]
    emitted = run_cli(settings, "emit", event_type, "{}")
    assert emitted.returncode == 0, emitted.stderr
    assert json.loads(emitted.stdout)["routed"] is False
    assert json.loads(emitted.stdout)["parked_in"] == f"queue {settings.unrouted_queue}"
    assert f"no consumer is bound for {settings.topic_for(event_type)}" in emitted.stderr
    assert len(await queued(real_backend.url, settings.unrouted_queue, 2)) == 2


async def test_the_content_type_is_the_amqp_property_not_a_header(
    real_backend: Backend,
) -> None:
    """CloudEvents AMQP binding (structured mode): for `emit`'s events and the loop's."""
    settings = real_backend.settings()
    watcher = real_backend.broker(
        settings.model_copy(update={"consumer_group": settings.consumer_group + "-watch"})
    )
    event_type = event_registry().names()[0]
    await watcher.start([settings.topic_for(INT_TYPE), settings.topic_for(event_type)])
    await relay_one_event(real_backend, settings)
    assert run_cli(settings, "emit", event_type, "{}").returncode == 0
    for message in await fetch_at_least(watcher, 2):
        delivery = message.handle
        assert delivery.content_type == CONTENT_TYPE
        assert CONTENT_TYPE_HEADER not in delivery.headers
        assert message.headers[CONTENT_TYPE_HEADER] == CONTENT_TYPE  # as the loop sees it


async def test_a_batch_is_published_under_one_wait_for_confirms_and_acked_by_one_multiple_ack(
    real_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Publisher confirms are awaited for a batch's messages together (every message is
    sent before the first confirm is waited for), and a batch is acked by one
    multiple-ack on its last delivery."""
    settings = real_backend.settings()
    topic = settings.topic_for("batched")
    broker = real_backend.broker(settings)
    assert isinstance(broker, RabbitMQBroker)
    await broker.start([topic])
    journal: list[str] = []
    assert broker._channel is not None
    channel = await broker._channel.get_underlay_channel()  # where the adapter publishes
    basic_publish = channel.basic_publish

    async def journaled_publish(body: bytes, *args: Any, **kwargs: Any) -> Any:
        journal.append("sent")
        confirmed = await basic_publish(body, *args, **kwargs)
        journal.append("confirmed")
        return confirmed

    monkeypatch.setattr(channel, "basic_publish", journaled_publish)
    await broker.publish([OutboundMessage(topic, b"m%d" % n) for n in range(50)])
    assert journal == ["sent"] * 50 + ["confirmed"] * 50

    acks: list[tuple[int, bool]] = []
    incoming_ack = aio_pika.IncomingMessage.ack

    async def counted_ack(self: Any, multiple: bool = False) -> None:
        acks.append((self.delivery_tag, multiple))
        await incoming_ack(self, multiple=multiple)

    monkeypatch.setattr(aio_pika.IncomingMessage, "ack", counted_ack)
    batch = await fetch_at_least(broker, 50)
    await broker.ack(batch)
    assert acks == [(max(message.position for message in batch), True)]
    assert await fetch_for(broker, 1.0) == []
