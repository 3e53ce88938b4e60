"""RabbitMQ adapter units (removed from Kafka services). Template-owned; do not edit."""

from __future__ import annotations

import pytest

from {{ cookiecutter.package_name }}.runtime.brokers.rabbitmq import (
    RabbitMQSettings,
    _text,
)
from {{ cookiecutter.package_name }}.runtime.config import ENV_PREFIX, load_model
from {{ cookiecutter.package_name }}.runtime.errors import ConfigError


def test_header_values_become_text() -> None:
    assert [_text(b"caf\xc3\xa9"), _text(7), _text(None)] == ["café", "7", None]


def test_bad_delivery_limit_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}AMQP_DELIVERY_LIMIT", "0")
    with pytest.raises(ConfigError, match="AMQP_DELIVERY_LIMIT: Input should be greater than 0"):
        load_model(RabbitMQSettings)
