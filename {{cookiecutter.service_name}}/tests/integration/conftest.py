"""Backends for the conformance suite: the in-memory bus and the real broker this service
was generated for. Real servers are used when their address is in the environment:

    TEST_KAFKA_BOOTSTRAP=127.0.0.1:9092              (Kafka flavour)
    TEST_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/ (RabbitMQ flavour)

Without an address the real-broker cases are skipped, except under CI=true, where a
missing server fails the run. Each test's topics (Kafka) or queues and dead-letter
exchanges (RabbitMQ) are deleted after it, so a shared development broker does not
collect them. Template-owned; do not edit.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, NoReturn

import pytest

from {{ cookiecutter.package_name }}.runtime.brokers import (
    Broker,
    InboundMessage,
    open_broker,
)
from {{ cookiecutter.package_name }}.runtime.brokers.memory import (
    MemoryBroker,
    MemoryBus,
    memory_limits,
)
from {{ cookiecutter.package_name }}.runtime.config import (
    ENV_PREFIX,
    PACKAGE_NAME,
    Settings,
)

from ..runtime.conftest import FAST, spans

__all__ = ["spans"]  # the span-exporter fixture, shared with the runtime tests

# Which real broker this service has: its support module survives baking.
SUPPORT_MODULES = {"kafka": "kafka_support", "rabbitmq": "rabbitmq_support"}


def _support(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"{__package__}.{SUPPORT_MODULES[name]}")
    except ModuleNotFoundError as error:
        if error.name and error.name.endswith(SUPPORT_MODULES[name]):
            return None
        raise


REAL = {name: module for name in SUPPORT_MODULES if (module := _support(name)) is not None}


@dataclass
class Backend:
    """One bus to test against, isolated per test by a unique group and topic prefix."""

    name: str
    url: str
    support: ModuleType | None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    bus: MemoryBus = field(default_factory=MemoryBus)
    opened: list[Broker] = field(default_factory=list)
    used: list[Settings] = field(default_factory=list)  # what its brokers were opened with

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            **FAST,
            "broker_url": self.url,
            "consumer_group": f"it-{PACKAGE_NAME}-{self.run_id}",
            "topic_prefix": f"it-{self.run_id}.",
            "batch_timeout_ms": 100,
        }
        return Settings(**{**values, **overrides})

    def broker(self, settings: Settings) -> Broker:
        broker: Broker = (
            MemoryBroker(
                self.bus, settings.consumer_group, limits=memory_limits(settings.max_message_bytes)
            )
            if self.support is None
            else open_broker(settings)
        )
        self.opened.append(broker)
        self.used.append(settings)
        return broker

    async def close(self) -> None:
        """Close the test's brokers; on a real one, delete the topics or queues it made."""
        for broker in self.opened:
            await broker.close()
        if self.support is not None:
            await self.support.remove_test_resources(self.url, self.used)
        self.opened.clear()
        self.used.clear()

    async def dead_letters(
        self, settings: Settings, topic: str, expected: int, deadline_s: float = 20.0
    ) -> list[tuple[bytes, dict[str, str]]]:
        """What messages from `topic` left in the dead-letter destination (`expected` of them)."""
        if self.support is None:
            return [
                (message.body, dict(message.headers))
                for message in self.bus.messages(settings.dead_letter_topic_for(topic))
            ]
        parked: list[tuple[bytes, dict[str, str]]] = await self.support.read_dead_letters(
            settings, topic, lambda seen: len(seen) >= expected, deadline_s
        )
        return parked


def unavailable(what: str, how: str) -> NoReturn:
    """A server or binary a test needs is missing: under CI (CI=true), which must provide
    it, the test fails; elsewhere it is skipped, saying how to provide it."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {what} is missing: {how}")
    pytest.skip(f"{what} is missing: {how}")


def make_backend(name: str) -> Backend:
    if name == "memory":
        return Backend("memory", "memory://", None)
    support = REAL[name]
    url: str | None = support.url_from_environment()
    if url is None:
        unavailable(support.ADDRESS_VARIABLE, f"set it to run against a real {name}")
    return Backend(name, url, support)


# Shorter group timeouts than production: a consumer that left is replaced sooner.
FAST_KAFKA_GROUPS = {"KAFKA_SESSION_TIMEOUT_MS": "6000", "KAFKA_HEARTBEAT_INTERVAL_MS": "1000"}


@pytest.fixture(autouse=True)
def _fast_kafka_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in FAST_KAFKA_GROUPS.items():
        monkeypatch.setenv(ENV_PREFIX + name, value)


# The real brokers' cases are the `servers` tier (pytest -m "not servers" leaves them out).
REAL_PARAMS = [pytest.param(name, marks=pytest.mark.servers) for name in REAL]


@pytest.fixture(params=["memory", *REAL_PARAMS])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """Every bus this service can use: the memory bus and its real broker."""
    chosen = make_backend(request.param)
    yield chosen
    await chosen.close()


@pytest.fixture(params=REAL_PARAMS)
async def real_backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """Only the real broker, for behaviour the memory bus does not model."""
    chosen = make_backend(request.param)
    yield chosen
    await chosen.close()


def _cli_env(settings: Settings, variables: dict[str, str]) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith(ENV_PREFIX)}
    given = {
        "BROKER_URL": settings.broker_url,
        "TOPIC_PREFIX": settings.topic_prefix,
        "CONSUMER_GROUP": settings.consumer_group,
        **variables,
    }
    env.update({ENV_PREFIX + name: value for name, value in given.items()})
    return env


def run_cli(settings: Settings, *args: str, **variables: str) -> subprocess.CompletedProcess[str]:
    """The service's command line, as an operator runs it, against the bus of `settings`."""
    return subprocess.run(
        [sys.executable, "-m", PACKAGE_NAME, *args],
        env=_cli_env(settings, variables),
        capture_output=True,
        text=True,
        timeout=120,
    )


def start_cli(settings: Settings, *args: str, **variables: str) -> subprocess.Popen[str]:
    """`run_cli`, left running (a tail): stdout and stderr are pipes."""
    return subprocess.Popen(
        [sys.executable, "-m", PACKAGE_NAME, *args],
        env=_cli_env(settings, variables),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def fetch_at_least(
    broker: Broker, count: int, deadline_s: float = 30.0
) -> list[InboundMessage]:
    """Fetch until `count` messages arrived (Kafka may first need to join the group)."""
    got: list[InboundMessage] = []
    async with asyncio.timeout(deadline_s):
        while len(got) < count:
            got += await broker.fetch_batch(count - len(got), 0.2, 0)
    return got


async def fetch_for(broker: Broker, seconds: float) -> list[InboundMessage]:
    """Everything that arrives within `seconds`."""
    got: list[InboundMessage] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        got += await broker.fetch_batch(100, 0.1, 0)
    return got


async def wait_until(done: Callable[[], bool], deadline_s: float = 30.0) -> None:
    async with asyncio.timeout(deadline_s):
        while not done():  # noqa: ASYNC110 - polls plain state, no event to wait on
            await asyncio.sleep(0.01)


def free_port() -> int:
    """A loopback port nobody listens on now (for a server of a test's own)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
