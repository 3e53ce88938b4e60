"""Operator commands against the real broker, run as an operator runs them: tail, dlq
list/show/redrive, replay. Template-owned; do not edit."""

from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from {{ cookiecutter.package_name }}.runtime.app import build_loop, event_registry
from {{ cookiecutter.package_name }}.runtime.brokers.base import event_message
from {{ cookiecutter.package_name }}.runtime.config import Settings
from {{ cookiecutter.package_name }}.runtime.envelope import (
    CloudEventsProtobufCodec,
    Envelope,
    new_event_id,
    now,
)

from ..runtime.conftest import FixableHandler, RunningLoop
from .conftest import Backend, fetch_at_least, run_cli, start_cli

REGISTRY = event_registry()
EVENT_TYPE = REGISTRY.names()[0]
MESSAGE_TYPE = REGISTRY.get(EVENT_TYPE)
CODEC = CloudEventsProtobufCodec(REGISTRY)
DEADLINE_S = 60.0


async def publish_events(backend: Backend, settings: Settings, count: int, key: str) -> list[str]:
    """`count` events of EVENT_TYPE with `key`, confirmed by the bus; their ids."""
    assert MESSAGE_TYPE is not None
    envelopes = [
        Envelope(new_event_id(), EVENT_TYPE, "urn:test", MESSAGE_TYPE(), key, now())
        for _ in range(count)
    ]
    producer = backend.broker(settings)
    await producer.start([])
    topic = settings.topic_for(EVENT_TYPE)
    await producer.publish([event_message(CODEC, envelope, topic) for envelope in envelopes])
    await producer.close()
    return [envelope.id for envelope in envelopes]


def summary(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    found: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])["summary"]
    return found


def one_line_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


async def test_tail_shows_events_and_takes_none_from_the_service(real_backend: Backend) -> None:
    backend = real_backend
    settings = backend.settings()
    topic = settings.topic_for(EVENT_TYPE)
    service = backend.broker(settings)
    await service.start([topic])  # the service's group (Kafka) or queue (RabbitMQ)
    await publish_events(backend, settings, 1, "k-0")
    await service.ack(await fetch_at_least(service, 1))
    await service.close()
    assert backend.support is not None
    assert await backend.support.waiting_for(settings, topic) == 0

    tail = start_cli(settings, "tail", "--type", EVENT_TYPE, "--count", "2", "--json")
    try:
        assert tail.stderr is not None
        ready = await asyncio.to_thread(tail.stderr.readline)  # subscribed from now on
        assert ready.startswith("tail: reading 1 event type(s) from now"), ready
        ids = await publish_events(backend, settings, 2, "k-1")
        stdout, stderr = await asyncio.to_thread(tail.communicate, timeout=DEADLINE_S)
    finally:
        tail.kill()
    assert tail.returncode == 0, stderr
    assert [json.loads(line)["id"] for line in stdout.splitlines()] == ids
    # Still waiting for the service: the group committed nothing, the queue lost nothing.
    assert await backend.support.waiting_for(settings, topic) == 2


async def test_reading_the_past_needs_a_bus_that_keeps_it(real_backend: Backend) -> None:
    settings = real_backend.settings()
    ids = await publish_events(real_backend, settings, 2, "k-1")
    tail = ["tail", "--type", EVENT_TYPE, "--from-beginning", "--count", "2", "--json"]
    if real_backend.name == "rabbitmq":
        one_line_error(run_cli(settings, *tail), "RabbitMQ keeps none")
        one_line_error(run_cli(settings, "replay", "--since", "1h"), "RabbitMQ keeps none")
        return
    result = run_cli(settings, *tail)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ids


class FailingService(FixableHandler):
    """The service: its handler dead-letters EVENT_TYPE until `fixed`; state in SQLite."""

    def __init__(self, backend: Backend, tmp_path: Path) -> None:
        super().__init__(MESSAGE_TYPE)
        self.backend = backend
        self.settings = backend.settings(state_url=f"sqlite:///{tmp_path / 'state.db'}")

    async def start(self) -> RunningLoop:
        broker = self.backend.broker(self.settings)
        running = RunningLoop(build_loop(self.settings, self.router, broker=broker))
        await running.wait_started(DEADLINE_S)
        return running

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(self.settings, *args, "--type", EVENT_TYPE)


async def test_redrive_handles_a_parked_event_once_and_again_changes_nothing(
    real_backend: Backend, tmp_path: Path
) -> None:
    service = FailingService(real_backend, tmp_path)
    running = await service.start()
    [event_id] = await publish_events(real_backend, service.settings, 1, "k-1")
    await running.wait_until(lambda: running.loop.stats.acked >= 1, DEADLINE_S)
    assert (await running.stop_gracefully()).dead_lettered == {"broken": 1}

    listed = service.cli("dlq", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [group] = json.loads(listed.stdout)["groups"]
    assert (group["reason"], group["count"], group["ids"]) == ("broken", 1, [event_id])
    shown = service.cli("dlq", "show", event_id, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["parked"][0]["detail"] == "the handler is not fixed yet"

    service.fixed = True
    running = await service.start()
    assert summary(service.cli("dlq", "redrive", "--json"))["republished"] == 1
    await running.wait_until(lambda: service.handled == [event_id], DEADLINE_S)
    # The same redrive again finds nothing left to do (RabbitMQ acked the parked
    # message; Kafka recorded how far the redrive got).
    assert summary(service.cli("dlq", "redrive", "--json"))["republished"] == 0
    # Another selection reads the whole dead-letter topic again (Kafka) and publishes
    # the same copy once more: the service drops it as a duplicate.
    again = summary(service.cli("dlq", "redrive", "--reason", "broken", "--json"))
    assert again["republished"] == (1 if real_backend.name == "kafka" else 0)
    # An event with the same key comes after anything re-published before it.
    [marker] = await publish_events(real_backend, service.settings, 1, "k-1")
    await running.wait_until(lambda: marker in service.handled, DEADLINE_S)
    await running.stop_gracefully()
    assert service.handled == [event_id, marker]


async def test_replay_republishes_exactly_a_window(real_backend: Backend) -> None:
    backend = real_backend
    settings = backend.settings()
    if backend.name == "rabbitmq":
        one_line_error(run_cli(settings, "replay", "--since", "10m"), "RabbitMQ keeps none")
        return
    await publish_events(backend, settings, 1, "k-1")
    await asyncio.sleep(0.01)  # the window's bounds apart from the records' milliseconds
    since = datetime.now(UTC)
    inside = await publish_events(backend, settings, 2, "k-1")
    await asyncio.sleep(0.01)
    until = datetime.now(UTC)
    await asyncio.sleep(0.01)
    await publish_events(backend, settings, 1, "k-1")

    copies = settings.topic_for("copies")
    window = ["--since", since.isoformat(), "--until", until.isoformat(), "--type", EVENT_TYPE]
    replayed = summary(run_cli(settings, "replay", *window, "--to-topic", copies, "--json"))
    assert (replayed["read"], replayed["republished"]) == (2, 2)
    reader = backend.broker(backend.settings(consumer_group=f"{settings.consumer_group}-r"))
    await reader.start([copies])
    got = await fetch_at_least(reader, 2, DEADLINE_S)
    assert sorted(CODEC.decode(message.body).id for message in got) == sorted(inside)
    await reader.ack(got)
