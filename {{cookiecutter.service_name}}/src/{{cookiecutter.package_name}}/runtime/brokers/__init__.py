"""Broker adapters, chosen by BROKER_URL's scheme."""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from ..config import Settings
from ..errors import ConfigError
from .base import Broker, BrokerUnavailable, DeadLetterRecord, InboundMessage, OutboundMessage
from .memory import MemoryBroker, MemoryBus, bus_for_url, memory_limits
from .reading import BusReader

# scheme -> module in this package that defines `open_broker(settings) -> Broker`
ADAPTER_MODULES = {"kafka": "kafka", "amqp": "rabbitmq", "amqps": "rabbitmq"}
# adapter module -> its operator reader (module, class), built on the adapter's Broker
READERS = {
    "memory": ("memory_reading", "MemoryReader"),
    "kafka": ("kafka_reading", "KafkaReader"),
    "rabbitmq": ("rabbitmq_reading", "RabbitMQReader"),
}

__all__ = [
    "Broker",
    "BrokerUnavailable",
    "DeadLetterRecord",
    "InboundMessage",
    "MemoryBroker",
    "MemoryBus",
    "OutboundMessage",
    "open_broker",
    "open_reader",
]


def open_broker(settings: Settings) -> Broker:
    scheme = urlsplit(settings.broker_url).scheme
    if scheme == "memory":
        return MemoryBroker(
            bus_for_url(settings.broker_url),
            settings.consumer_group,
            limits=memory_limits(settings.max_message_bytes),
            dead_letters=settings.dead_letter_topic,
        )
    module_name = ADAPTER_MODULES[scheme]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{module_name}":
            raise
        raise ConfigError(
            f"BROKER_URL {settings.broker_url!r}: this service has no {module_name} adapter "
            "(it was generated for another broker, or the adapter is not part of this version)"
        ) from None
    broker: Broker = module.open_broker(settings)
    return broker


def open_reader(settings: Settings) -> BusReader:
    """A reader of the bus for operator commands (tail, dlq, replay)."""
    broker = open_broker(settings)
    scheme = urlsplit(settings.broker_url).scheme
    module_name, class_name = READERS[ADAPTER_MODULES.get(scheme, scheme)]
    reader: BusReader = getattr(importlib.import_module(f"{__name__}.{module_name}"), class_name)(
        settings, broker
    )
    return reader
