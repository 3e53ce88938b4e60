"""The archiver (`<service> archive`) on the memory bus, into a local folder: what the
files hold, rotation by size and by age, and an object-store outage."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pytest

from {{ cookiecutter.package_name }}.events.orders_pb2 import (
    OrderCancelled,
    OrderPlaced,
    StockReserved,
)
from {{ cookiecutter.package_name }}.runtime import cli
from {{ cookiecutter.package_name }}.runtime.app import build_loop, event_registry
from {{ cookiecutter.package_name }}.runtime.archive.files import UNDECODABLE_TYPE
from {{ cookiecutter.package_name }}.runtime.archive.sink import (
    ArchiveSettings,
    build_archiver,
)
from {{ cookiecutter.package_name }}.runtime.brokers.base import (
    OutboundMessage,
    event_message,
)
from {{ cookiecutter.package_name }}.runtime.brokers.memory import (
    MemoryBroker,
    MemoryBus,
    bus_for_url,
)
from {{ cookiecutter.package_name }}.runtime.claimcheck import (
    HEADER,
    ClaimCheck,
    ClaimCheckSettings,
)
from {{ cookiecutter.package_name }}.runtime.config import ENV_PREFIX, Settings
from {{ cookiecutter.package_name }}.runtime.dedupe import REDRIVE_HEADER
from {{ cookiecutter.package_name }}.runtime.envelope import (
    CloudEventsProtobufCodec,
    Envelope,
    event_type_of,
)
from {{ cookiecutter.package_name }}.runtime.objectstore import (
    ObjectInfo,
    ObjectStoreSettings,
    ObjectStoreUnavailable,
    ObstoreObjects,
    open_object_store,
)
from {{ cookiecutter.package_name }}.runtime.router import Context, Router
from {{ cookiecutter.package_name }}.runtime.state.memory import MemoryStateStore
from {{ cookiecutter.package_name }}.runtime.testing import ServiceHarness

from .conftest import RunningLoop, fast_settings, publish_to
from .test_operator import Service, window_of_three

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def archive_settings(**overrides: Any) -> ArchiveSettings:
    return ArchiveSettings(**{"archive_writer": "test-writer", **overrides})


def local_store(folder: Path) -> ObstoreObjects:
    return open_object_store(ObjectStoreSettings(archive_url=folder.as_uri()))


def parquet_files(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*.parquet"))


def read_archive(folder: Path) -> Any:
    """All rows, as a reader of the table would see them (Hive partitions as columns)."""
    dataset = ds.dataset(folder, format="parquet", partitioning="hive")
    return dataset.to_table().to_pylist()


class Archiver:
    """A harness's bus with an archiver loop running on it."""

    def __init__(self, store: Any, archive: ArchiveSettings, **settings: Any) -> None:
        self.service = ServiceHarness(Router(), **settings)
        self.archive = archive
        self.broker = MemoryBroker(self.service.bus, archive.archive_group)
        self.loop = build_archiver(self.service.settings, archive, store, broker=self.broker)

    @property
    def pending(self) -> int:
        return self.service.bus.pending(self.archive.archive_group)


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[Archiver, RunningLoop]]:
    archiver = Archiver(local_store(tmp_path), archive_settings())
    running = RunningLoop(archiver.loop)
    await running.wait_started()
    yield archiver, running
    if not running.task.done():
        await running.stop_gracefully()


async def test_every_event_lands_in_a_parquet_file_with_its_attributes(
    tmp_path: Path, running: tuple[Archiver, RunningLoop]
) -> None:
    archiver, loop = running
    service = archiver.service
    placed = [
        await service.publish(
            OrderPlaced(order_id=f"o{i}", quantity=1),
            key=f"o{i}",
            headers={"traceparent": TRACEPARENT},
        )
        for i in range(5)
    ]
    cancelled = await service.publish(OrderCancelled(order_id="o1"), key="o1")
    service.publish_raw(b"\xffnot an event", "some.topic", key="k")
    service.publish_raw(b"parked", "order_service.dlq")  # a dead letter: not archived
    await loop.wait_until(lambda: archiver.pending == 0 and service.bus.published != [])
    await loop.stop_gracefully()

    rows = read_archive(tmp_path)
    by_id = {row["id"]: row for row in rows if row["id"] is not None}
    assert sorted(by_id) == sorted([*placed, cancelled])
    first = by_id[placed[0]]
    assert first["type"] == "{{ cookiecutter.package_name }}.events.OrderPlaced"
    assert first["subject"] == "o0"
    assert first["source"] and first["time"] is not None
    assert first["datacontenttype"] == "application/protobuf"
    assert dict(first["headers"])["traceparent"] == TRACEPARENT
    originals = {m.body for m in service.bus.published}
    assert all(row["envelope"] in originals for row in rows)
    [raw] = [row for row in rows if row["id"] is None]
    assert raw["type"] == UNDECODABLE_TYPE
    assert raw["envelope"] == b"\xffnot an event"
    assert raw["topic"] == "some.topic"
    assert b"parked" not in {row["envelope"] for row in rows}
    files = parquet_files(tmp_path)
    assert files[0].startswith("type=")
    assert "/date=" in files[0] and "/hour=" in files[0]
    assert all(name.rsplit("/", 1)[1].startswith("test-writer-") for name in files)


async def test_events_of_other_producers_get_their_attribute_columns(
    tmp_path: Path, running: tuple[Archiver, RunningLoop]
) -> None:
    """CloudEvents in binary mode (attributes in headers) and in structured JSON mode are
    archived with their attributes, under their type and hour, bytes and headers as sent."""
    archiver, loop = running
    service = archiver.service
    topic = service.settings.topic_for(PLACED)
    binary = {
        "ce_specversion": "1.0",
        "ce_id": "java-1",
        "ce_source": "urn:java",
        "ce_type": PLACED,
        "ce_subject": "o7",
        "ce_time": "2025-05-01T10:15:00Z",
        "ce_dataschema": "urn:schema:1",
        "content-type": "application/json",
    }
    service.publish_raw(b'{"orderId": "o7"}', topic, key="o7", headers=binary)
    structured = {
        "specversion": "1.0",
        "id": "go-1",
        "source": "urn:go",
        "type": PLACED,
        "time": "2025-05-01T11:45:00+00:00",
        "data": {"orderId": "o8"},
    }
    body = json.dumps(structured).encode()
    json_headers = {"content-type": "application/cloudevents+json"}
    service.publish_raw(body, topic, key="o8", headers=json_headers)
    await loop.wait_until(lambda: archiver.pending == 0 and len(service.bus.published) == 2)
    await loop.stop_gracefully()

    by_id = {row["id"]: row for row in read_archive(tmp_path)}
    assert sorted(by_id) == ["go-1", "java-1"]
    java, go = by_id["java-1"], by_id["go-1"]
    assert java["type"] == go["type"] == PLACED
    assert (java["source"], java["subject"]) == ("urn:java", "o7")
    assert java["dataschema"] == "urn:schema:1"
    assert java["datacontenttype"] == "application/json"
    assert java["time"] == datetime(2025, 5, 1, 10, 15, tzinfo=UTC)
    assert (java["hour"], go["hour"]) == (10, 11)
    assert java["envelope"] == b'{"orderId": "o7"}'
    assert dict(java["headers"]) == binary
    assert (go["source"], go["envelope"]) == ("urn:go", body)


async def test_files_rotate_by_size(tmp_path: Path) -> None:
    archiver = Archiver(
        local_store(tmp_path), archive_settings(archive_file_max_bytes=1), batch_size=2
    )
    loop = RunningLoop(archiver.loop)
    await loop.wait_started()
    for i in range(6):
        await archiver.service.publish(OrderPlaced(order_id=f"o{i}"), key=f"o{i}")
    await loop.wait_until(lambda: archiver.pending == 0)
    await loop.stop_gracefully()
    assert len(parquet_files(tmp_path)) >= 3  # at most one batch (2 events) per file
    assert len(read_archive(tmp_path)) == 6


async def test_files_rotate_by_age_while_the_archiver_runs(tmp_path: Path) -> None:
    """Nothing fills a file nor stops the loop: its events are acked all the same, once
    the file was written for its age."""
    archiver = Archiver(local_store(tmp_path), archive_settings(archive_file_max_age_s=0.05))
    loop = RunningLoop(archiver.loop)
    await loop.wait_started()
    await archiver.service.publish(OrderPlaced(order_id="o1"), key="o1")
    await loop.wait_until(lambda: archiver.pending == 0)
    assert not loop.task.done()
    assert len(read_archive(tmp_path)) == 1
    await loop.stop_gracefully()


class FailingStore:
    """A store that is down until `available` is set."""

    def __init__(self, store: ObstoreObjects) -> None:
        self.store = store
        self.url = store.url
        self.available = asyncio.Event()
        self.refused = 0

    async def put(self, path: str, data: bytes) -> None:
        if not self.available.is_set():
            self.refused += 1
            raise ObjectStoreUnavailable("down")
        await self.store.put(path, data)

    async def get(self, path: str) -> bytes:
        return await self.store.get(path)

    async def size(self, path: str) -> int:
        return await self.store.size(path)

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        return await self.store.list(prefix)


async def test_a_store_outage_holds_the_acks_and_loses_nothing(tmp_path: Path) -> None:
    store = FailingStore(local_store(tmp_path))
    archiver = Archiver(store, archive_settings(), publish_retry_max_backoff_ms=5)
    loop = RunningLoop(archiver.loop)
    await loop.wait_started()
    publish = archiver.service.publish
    ids = [await publish(OrderPlaced(order_id=f"o{i}"), key=f"o{i}") for i in range(4)]
    await loop.wait_until(lambda: store.refused >= 3)
    assert archiver.pending == 4  # none acked while no file could be written
    store.available.set()
    await loop.wait_until(lambda: archiver.pending == 0)
    await loop.stop_gracefully()
    assert sorted(row["id"] for row in read_archive(tmp_path)) == sorted(ids)


CODEC = CloudEventsProtobufCodec(event_registry())
PLACED = event_type_of(OrderPlaced)


def event_at(hour: int, minute: int, key: str, event_id: str | None = None) -> OutboundMessage:
    """An OrderPlaced stamped 2025-05-01 at hour:minute (UTC), as a producer publishes it."""
    envelope = Envelope(
        id=event_id or f"e-{hour}-{minute}-{key}",
        type=PLACED,
        source="urn:test",
        payload=OrderPlaced(order_id=key, quantity=hour),
        subject=key,
        time=datetime(2025, 5, 1, hour, minute, tzinfo=UTC),
    )
    return event_message(CODEC, envelope, PLACED, {"traceparent": TRACEPARENT})


async def archive_all(folder: Path, messages: Sequence[OutboundMessage]) -> None:
    archiver = Archiver(local_store(folder), archive_settings())
    loop = RunningLoop(archiver.loop)
    await loop.wait_started()
    for message in messages:
        archiver.service.bus.put(message)
    await loop.wait_until(lambda: archiver.pending == 0)
    await loop.stop_gracefully()


# Published out of event-time order, one of them twice (a producer's retry).
ARCHIVED = [
    event_at(11, 30, "b"),
    event_at(10, 0, "a"),
    event_at(11, 0, "a"),
    event_at(11, 30, "b"),
    event_at(13, 0, "c"),
]
IN_WINDOW = ["e-11-0-a", "e-11-30-b"]  # --since 10:30 --until 12:00, in event-time order
WINDOW = ("--since", "2025-05-01T10:30:00Z", "--until", "2025-05-01T12:00:00Z")


class Operator:
    """The operator commands, as the CLI runs them, over an archive in `folder`."""

    def __init__(
        self, folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv(f"{ENV_PREFIX}ARCHIVE_URL", folder.as_uri())
        self.settings = Settings(broker_url=f"memory://archive-{uuid.uuid4().hex}")
        self.bus = bus_for_url(self.settings.broker_url)
        self.capsys = capsys

    async def lines(self, *argv: str) -> list[Any]:
        self.capsys.readouterr()
        args = cli._parser().parse_args(list(argv))
        assert await cli.OPERATOR_COMMANDS[args.command].run(self.settings, args) == 0
        return [json.loads(line) for line in self.capsys.readouterr().out.splitlines()]

    async def summary(self, *argv: str) -> dict[str, Any]:
        found: dict[str, Any] = (await self.lines(*argv, "--json"))[-1]["summary"]
        return found

    def ids(self, topic: str) -> list[str]:
        return [CODEC.decode(message.body).id for message in self.bus.messages(topic)]


@pytest.fixture
async def operator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Operator:
    await archive_all(tmp_path, ARCHIVED)
    return Operator(tmp_path, monkeypatch, capsys)


async def test_events_query_prints_a_window_decoded_each_id_once(operator: Operator) -> None:
    events = await operator.lines("events", "query", *WINDOW, "--type", "*.OrderPlaced")
    assert [event["id"] for event in events] == IN_WINDOW
    first = events[0]
    assert first["payload"] == {"orderId": "a", "quantity": 11}
    assert first["time"] == "2025-05-01T11:00:00.000Z"
    assert first["headers"]["traceparent"] == TRACEPARENT
    assert await operator.lines("events", "query", "--subject", "c") == [
        event for event in await operator.lines("events", "query") if event["subject"] == "c"
    ]
    assert await operator.lines("events", "query", "--type", "nothing.*") == []


async def test_events_query_counts_per_hour_and_runs_sql(operator: Operator) -> None:
    counts = await operator.lines("events", "query", "--counts")
    assert [(row["hour"], row["events"]) for row in counts] == [("10", 1), ("11", 2), ("13", 1)]
    assert {row["type"] for row in counts} == {PLACED}
    [row] = await operator.lines(
        "events", "query", "--sql", "SELECT count(*) AS n, count(DISTINCT id) AS ids FROM events"
    )
    assert row == {"n": 4, "ids": 4}


async def test_a_bad_query_is_one_line(operator: Operator) -> None:
    with pytest.raises(Exception, match="--sql") as raised:
        await operator.lines("events", "query", "--sql", "SELECT nope FROM events")
    assert "\n" not in str(raised.value)


async def test_replay_from_the_archive_republishes_a_window_in_event_time_order(
    operator: Operator,
) -> None:
    dry = await operator.summary("replay", "--from-archive", *WINDOW, "--dry-run")
    assert (dry["read"], dry["republished"], dry["skipped"]) == (2, 0, 2)
    assert operator.bus.published == []
    summary = await operator.summary(
        "replay", "--from-archive", *WINDOW, "--to-topic", "copies", "--reprocess"
    )
    assert (summary["read"], summary["republished"]) == (2, 2)
    assert operator.ids("copies") == IN_WINDOW
    originals = {message.body for message in ARCHIVED}
    assert all(message.body in originals for message in operator.bus.published)
    assert all(
        message.headers[REDRIVE_HEADER].startswith(operator.settings.consumer_group)
        for message in operator.bus.published
    )
    await operator.summary("replay", "--from-archive", "--since", "2025-05-01T12:30:00Z")
    assert operator.ids(PLACED) == ["e-13-0-c"]  # into its own topic by default


async def test_a_service_that_handled_an_archived_window_drops_its_replay_unless_reprocessed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    service = Service()
    service.fixed = True
    inside, since, until = await window_of_three(service)
    assert (await service.run_until_idle()).handled == 4
    await archive_all(tmp_path, service.bus.messages(service.topic))
    monkeypatch.setenv(f"{ENV_PREFIX}ARCHIVE_URL", tmp_path.as_uri())
    window = ["--from-archive", "--since", since.isoformat(), "--until", until.isoformat()]

    assert (await service.summary(capsys, "replay", *window))["republished"] == 2
    stats = await service.run_until_idle()
    assert (stats.handled, stats.duplicates) == (0, 2)  # ids kept: nothing runs again
    for _ in range(2):  # asked to handle them again, once, however often the replay runs
        assert (await service.summary(capsys, "replay", *window, "--reprocess"))["read"] == 2
    stats = await service.run_until_idle()
    assert (stats.handled, stats.duplicates) == (2, 2)
    assert sorted(service.handled[-2:]) == sorted(inside)


async def test_replay_from_the_archive_goes_on_where_a_crash_left_it(
    operator: Operator, monkeypatch: pytest.MonkeyPatch
) -> None:
    put = operator.bus.put
    allowed = [1]

    def failing_after_one(message: OutboundMessage) -> int:
        if not allowed:
            raise KeyboardInterrupt  # the process dies mid-replay
        allowed.pop()
        return put(message)

    replay = ("replay", "--from-archive", "--to-topic", "copies", "--rate", "10")  # 1 a publish
    monkeypatch.setattr(operator.bus, "put", failing_after_one)
    with pytest.raises(KeyboardInterrupt):
        await operator.summary(*replay, "--resume", "r1")
    assert operator.ids("copies") == ["e-10-0-a"]
    monkeypatch.setattr(operator.bus, "put", put)
    summary = await operator.summary(*replay, "--resume", "r1")
    assert (summary["read"], summary["republished"], summary["skipped"]) == (4, 3, 1)
    assert operator.ids("copies") == ["e-10-0-a", "e-11-0-a", "e-11-30-b", "e-13-0-c"]


# Claim-check: large payloads in the object store, a pointer in the envelope.


class ClaimChecked:
    """A service that emits one large StockReserved per OrderPlaced, and another that
    consumes those, both claim-checking through a local folder."""

    def __init__(self, folder: Path, threshold: int = 1_000) -> None:
        store = local_store(folder)
        self.claim_check = ClaimCheck(
            store, ClaimCheckSettings(claim_check_threshold_bytes=threshold)
        )
        self.bus = MemoryBus()
        self.emitter = Router()
        self.received: list[StockReserved] = []

        @self.emitter.handles(OrderPlaced)
        async def emit_large(event: OrderPlaced, ctx: Context) -> None:
            ctx.emit(StockReserved(order_id=event.order_id, sku="s" * 5_000), key=event.order_id)

        self.consumer = Router()

        @self.consumer.handles(StockReserved)
        async def record(event: StockReserved, ctx: Context) -> None:
            self.received.append(event)

    async def run(self, router: Router, group: str) -> tuple[RunningLoop, Any]:
        settings = fast_settings(consumer_group=group)
        loop = build_loop(
            settings,
            router,
            broker=MemoryBroker(self.bus, group),
            state=MemoryStateStore(1000, 3600, time.time),
            claim_check=self.claim_check,
        )
        running = RunningLoop(loop)
        await running.wait_started()
        return running, loop


async def test_a_large_payload_travels_as_a_pointer_and_arrives_whole(tmp_path: Path) -> None:
    checked = ClaimChecked(tmp_path)
    consumer, _ = await checked.run(checked.consumer, "consumer")
    emitter, _ = await checked.run(checked.emitter, "emitter")
    await publish_to(checked.bus, checked.emitter, OrderPlaced(order_id="o1"), key="o1")
    await consumer.wait_until(lambda: len(checked.received) == 1)
    await emitter.stop_gracefully()
    await consumer.stop_gracefully()
    assert checked.received[0].sku == "s" * 5_000
    [sent] = checked.bus.messages(event_type_of(StockReserved))
    assert len(sent.body) < 1_000 and sent.headers[HEADER] == "1"
    assert [path.name for path in (tmp_path / "claims").iterdir()] != []


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (lambda path: path.unlink(), "claim-check-missing"),
        (lambda path: path.write_bytes(b"\x0a\x03abc"), "claim-check-corrupt"),
        (lambda path: path.write_bytes(b"x" * 10_000), "claim-check-oversized"),
    ],
)
async def test_a_payload_that_cannot_be_had_is_dead_lettered_with_its_reason(
    tmp_path: Path, spoil: Any, reason: str
) -> None:
    checked = ClaimChecked(tmp_path)
    checked.claim_check.max_bytes = 9_000
    emitter, _ = await checked.run(checked.emitter, "emitter")
    checked.bus.bind("consumer", [event_type_of(StockReserved)])  # queued meanwhile
    await publish_to(checked.bus, checked.emitter, OrderPlaced(order_id="o1"), key="o1")
    await emitter.wait_until(lambda: checked.bus.messages(event_type_of(StockReserved)) != [])
    await emitter.stop_gracefully()
    [stored] = list((tmp_path / "claims").iterdir())
    spoil(stored)
    consumer, _ = await checked.run(checked.consumer, "consumer")
    dead_letters = f"{event_type_of(StockReserved)}.dlq"
    await consumer.wait_until(lambda: checked.bus.messages(dead_letters) != [])
    await consumer.stop_gracefully()
    [parked] = checked.bus.messages(dead_letters)
    assert parked.headers["x-dead-letter-reason"] == reason
    assert checked.received == []


def test_the_topics_archived_follow_the_prefix_and_leave_out_dead_letters() -> None:
    settings = Settings(topic_prefix="prod.")
    default = ArchiveSettings().topic_pattern(settings)
    assert default.match("prod.orders.OrderPlaced")
    assert not default.match("prod.orders.OrderPlaced.dlq")
    assert not default.match("test.orders.OrderPlaced")
    chosen = ArchiveSettings(archive_topics=r"orders\..*", archive_dead_letters=True)
    pattern = chosen.topic_pattern(settings)
    assert pattern.match("prod.orders.OrderPlaced.dlq")
    assert not pattern.match("prod.billing.Invoiced")
