"""Operator commands (tail, dlq, replay) on the memory bus, run in-process against the
loop; the same commands against the real broker are in tests/integration. Template-owned."""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from {{ cookiecutter.package_name }}.runtime import cli
from {{ cookiecutter.package_name }}.runtime.app import event_registry
from {{ cookiecutter.package_name }}.runtime.brokers.base import (
    BrokerUnavailable,
    OutboundMessage,
)
from {{ cookiecutter.package_name }}.runtime.brokers.memory import MemoryBus, bus_for_url
from {{ cookiecutter.package_name }}.runtime.brokers.memory_reading import MemoryReader
from {{ cookiecutter.package_name }}.runtime.config import Settings
from {{ cookiecutter.package_name }}.runtime.dedupe import REDRIVE_HEADER
from {{ cookiecutter.package_name }}.runtime.envelope import CloudEventsProtobufCodec
from {{ cookiecutter.package_name }}.runtime.errors import CommandFailed
from {{ cookiecutter.package_name }}.runtime.loop import LoopStats
from {{ cookiecutter.package_name }}.runtime.operator import progress
from {{ cookiecutter.package_name }}.runtime.state.memory import MemoryStateStore

from .conftest import FixableHandler, RunningLoop, fast_settings, make_loop, publish_to

EVENT_TYPE = event_registry().names()[0]
MESSAGE_TYPE = event_registry().get(EVENT_TYPE)
CODEC = CloudEventsProtobufCodec(event_registry())


class Service(FixableHandler):
    """A service on a named memory bus (which the operator commands open too), whose
    handler fails until `fixed`; it records the ids it handled."""

    def __init__(self) -> None:
        super().__init__(MESSAGE_TYPE)
        self.settings: Settings = fast_settings(broker_url=f"memory://op-{uuid.uuid4().hex}")
        self.bus: MemoryBus = bus_for_url(self.settings.broker_url)
        self.state = MemoryStateStore(100_000, 3600, time.time)  # kept across runs
        self.topic = self.settings.topic_for(EVENT_TYPE)
        self.bus.bind(self.settings.consumer_group, [self.topic])

    async def publish(self, key: str = "k-1") -> str:
        assert MESSAGE_TYPE is not None
        return await publish_to(self.bus, self.router, MESSAGE_TYPE(), key=key)

    async def run_until_idle(self) -> LoopStats:
        running = RunningLoop(make_loop(self.router, self.bus, self.state, self.settings))
        await running.wait_until(lambda: not self.bus.pending(self.settings.consumer_group))
        return await running.stop_gracefully()

    async def operate(self, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
        """Runs an operator command as the CLI does; returns what it printed."""
        capsys.readouterr()  # not the loop's logs
        args = cli._parser().parse_args(list(argv))
        assert await cli.OPERATOR_COMMANDS[args.command].run(self.settings, args) == 0
        return capsys.readouterr().out

    async def summary(self, capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
        lines = (await self.operate(capsys, *argv, "--json")).splitlines()
        found: dict[str, Any] = json.loads(lines[-1])["summary"]
        return found


async def test_a_parked_event_published_back_as_it_is_is_a_duplicate() -> None:
    """What the runbook used to advise: the copy keeps its id, so dedupe drops it."""
    service = Service()
    await service.publish()
    assert (await service.run_until_idle()).dead_lettered == {"broken": 1}
    [parked] = [m for m in service.bus.published if m.dead_letter]
    service.fixed = True
    service.bus.put(OutboundMessage(service.topic, parked.body, parked.key))
    stats = await service.run_until_idle()
    assert (stats.handled, stats.duplicates, service.handled) == (0, 1, [])


async def test_redrive_handles_a_parked_event_once_and_again_changes_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    service = Service()
    event_id = await service.publish()
    await service.run_until_idle()
    service.fixed = True

    listed = json.loads(await service.operate(capsys, "dlq", "list", "--json"))
    [group] = listed["groups"]
    assert (group["reason"], group["type"], group["count"]) == ("broken", EVENT_TYPE, 1)
    assert (group["origin"], group["ids"]) == (service.topic, [event_id])
    shown = json.loads(await service.operate(capsys, "dlq", "show", event_id, "--json"))
    [parked] = shown["parked"]
    assert (parked["reason"], parked["detail"], parked["payload"]) == (
        "broken",
        "the handler is not fixed yet",
        {},
    )

    first = await service.summary(capsys, "dlq", "redrive")
    assert (first["read"], first["matched"], first["republished"]) == (1, 1, 1)
    assert (await service.run_until_idle()).handled == 1
    assert service.handled == [event_id]

    # The same redrive again continues where the first got to: nothing is left.
    again = await service.summary(capsys, "dlq", "redrive")
    assert (again["read"], again["republished"]) == (0, 0)
    # Another selection reads from the start and publishes the same copy once more:
    # the same redrive generation, so the service drops it.
    other = await service.summary(capsys, "dlq", "redrive", "--reason", "broken")
    assert other["republished"] == 1
    stats = await service.run_until_idle()
    assert (stats.handled, stats.duplicates) == (0, 1)
    assert service.handled == [event_id]


async def test_a_redrive_cut_short_after_publishing_runs_the_handler_once(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash between the re-publish and recording it: the next run publishes again."""
    service = Service()
    event_id = await service.publish()
    await service.run_until_idle()
    service.fixed = True
    settle = MemoryReader.settle

    async def lost(self: MemoryReader, read: Sequence[Any], redriven: Sequence[Any]) -> None:
        monkeypatch.setattr(MemoryReader, "settle", settle)
        raise BrokerUnavailable("the bus went away")

    monkeypatch.setattr(MemoryReader, "settle", lost)
    with pytest.raises(CommandFailed, match="Run the same redrive again"):
        await service.operate(capsys, "dlq", "redrive")
    assert (await service.summary(capsys, "dlq", "redrive"))["republished"] == 1
    stats = await service.run_until_idle()
    assert (stats.handled, stats.duplicates) == (1, 1)
    assert service.handled == [event_id]


async def test_an_event_of_another_producer_is_listed_shown_and_redriven_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A CloudEvent in binary content mode (ce_ headers, protobuf data): parked with its
    headers, read by the operator commands, redriven in the same mode."""
    service = Service()
    assert MESSAGE_TYPE is not None
    headers = {
        "ce_specversion": "1.0",
        "ce_id": "java-1",
        "ce_source": "urn:java",
        "ce_type": EVENT_TYPE,
        "ce_subject": "k-9",
        "content-type": "application/protobuf",
    }
    body = MESSAGE_TYPE().SerializeToString()
    service.bus.put(OutboundMessage(service.topic, body, "k-9", headers))
    assert (await service.run_until_idle()).dead_lettered == {"broken": 1}
    service.fixed = True

    [group] = json.loads(await service.operate(capsys, "dlq", "list", "--json"))["groups"]
    assert (group["type"], group["ids"]) == (EVENT_TYPE, ["java-1"])
    shown = json.loads(await service.operate(capsys, "dlq", "show", "java-1", "--json"))
    [parked] = shown["parked"]
    assert (parked["subject"], parked["payload"]) == ("k-9", {})
    assert (await service.summary(capsys, "dlq", "redrive"))["republished"] == 1
    assert (await service.run_until_idle()).handled == 1
    assert service.handled == ["java-1"]


async def test_a_redrive_of_another_group_is_a_duplicate_here() -> None:
    service = Service()
    service.fixed = True
    await service.publish()
    await service.run_until_idle()
    [original] = [m for m in service.bus.published if m.topic == service.topic]
    for group in ("another-service", service.settings.consumer_group):
        headers = {**original.headers, REDRIVE_HEADER: f"{group}#1"}
        service.bus.put(OutboundMessage(service.topic, original.body, original.key, headers))
    stats = await service.run_until_idle()
    assert (stats.handled, stats.duplicates) == (1, 1)  # only the copy for this group


async def test_tail_prints_events_and_takes_nothing_from_the_service(
    capsys: pytest.CaptureFixture[str],
) -> None:
    service = Service()
    ids = [await service.publish(key=f"k-{n}") for n in range(2)]
    out = await service.operate(
        capsys, "tail", "--from-beginning", "--count", "2", "--json", "--type", EVENT_TYPE
    )
    shown = [json.loads(line) for line in out.splitlines()]
    assert [view["id"] for view in shown] == ids
    assert [view["subject"] for view in shown] == ["k-0", "k-1"]
    assert service.bus.pending(service.settings.consumer_group) == 2  # still the service's
    lines = await service.operate(capsys, "tail", "--from-beginning", "--count", "1")
    assert f"{EVENT_TYPE}  {ids[0]}  subject=k-0  key=k-0" in lines


async def window_of_three(service: Service) -> tuple[list[str], datetime, datetime]:
    """Events before, within and after a window; returns the ids within and its bounds."""
    await service.publish()
    await asyncio.sleep(0.002)  # keeps the bounds apart from the publish times
    since = datetime.now(UTC)
    inside = [await service.publish(), await service.publish()]
    until = datetime.now(UTC)
    await asyncio.sleep(0.002)
    await service.publish()
    return inside, since, until


async def test_replay_republishes_exactly_a_window(capsys: pytest.CaptureFixture[str]) -> None:
    service = Service()
    inside, since, until = await window_of_three(service)
    summary = await service.summary(
        capsys,
        "replay",
        "--since",
        since.isoformat(),
        "--until",
        until.isoformat(),
        "--type",
        EVENT_TYPE,
        "--to-topic",
        "copies",
    )
    assert (summary["read"], summary["republished"]) == (2, 2)
    copies = service.bus.messages("copies")
    assert [CODEC.decode(message.body).id for message in copies] == inside


async def test_replay_into_the_service_is_a_duplicate_unless_reprocessed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    service = Service()
    service.fixed = True
    inside, since, until = await window_of_three(service)
    await service.run_until_idle()
    window = ["--since", since.isoformat(), "--until", until.isoformat(), "--type", EVENT_TYPE]
    await service.summary(capsys, "replay", *window)
    assert (await service.run_until_idle()).duplicates == 2
    for _ in range(2):  # a second identical replay runs no handler again
        assert (await service.summary(capsys, "replay", *window, "--reprocess"))["read"] == 2
    stats = await service.run_until_idle()
    assert (stats.handled, stats.duplicates) == (2, 2)
    assert sorted(service.handled[-2:]) == sorted(inside)


def test_progress_off_a_terminal_is_counts_and_a_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "REPORT_EVERY_S", 0.0)
    for as_json in (False, True):
        stream = io.StringIO()  # not a terminal: no bar
        counted = progress.Progress("dlq redrive", 2, as_json=as_json, stream=stream)
        counted.add(read=1, matched=1)
        counted.add(read=1, republished=1)
        summary = counted.finish()
        first, second = stream.getvalue().splitlines()
        if as_json:
            assert json.loads(second)["read"] == 2 and json.loads(second)["total"] == 2
            assert json.loads(counted.summary_line(summary))["summary"]["republished"] == 1
        else:
            assert first.startswith("dlq redrive: read 1, matched 1, re-published 0")
            assert "(read of 2;" in second and second.endswith("/s)")
            assert counted.summary_line(summary).startswith(
                "dlq redrive: read 2, matched 1, re-published 1, skipped 0, failed 0 in "
            )
