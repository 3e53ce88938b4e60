"""RabbitMQ-specific behaviour against a real broker (removed from Kafka services).

The TLS tests use the broker's amqps listener, which requires client certificates:
TEST_AMQPS_URL with TEST_AMQPS_CA_FILE, TEST_AMQPS_CERT_FILE and TEST_AMQPS_KEY_FILE
(scripts/servers.sh in the template sets them; under CI=true they must be set).
"""

from __future__ import annotations

import os
from pathlib import Path

import aio_pika
import pytest
from aio_pika.exceptions import ChannelNotFoundEntity

from {{ cookiecutter.package_name }}.runtime.brokers.base import (
    BrokerUnavailable,
    OutboundMessage,
)
from {{ cookiecutter.package_name }}.runtime.brokers.rabbitmq import RabbitMQBroker
from {{ cookiecutter.package_name }}.runtime.errors import ConfigError

from .conftest import Backend, fetch_at_least, fetch_for
from .test_conformance import publish
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
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {', '.join(missing)} not set: start the servers")
        pytest.skip(f"set {', '.join(TLS_VARIABLES)} to test RabbitMQ over TLS")
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

    await consumer.drop_connection_for_tests()
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
    made = [settings.consumer_group, settings.dead_letter_queue]
    assert await existing_queues(real_backend.url, made) == made
    await real_backend.close()
    assert await existing_queues(real_backend.url, made) == []
