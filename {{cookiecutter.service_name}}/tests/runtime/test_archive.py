"""The archiver (`<service> archive`) on the memory bus, into a local folder: what the
files hold, rotation by size and by age, and an object-store outage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pytest

from {{ cookiecutter.package_name }}.events.orders_pb2 import OrderCancelled, OrderPlaced
from {{ cookiecutter.package_name }}.runtime.archive.files import UNDECODABLE_TYPE
from {{ cookiecutter.package_name }}.runtime.archive.sink import ArchiveSettings, build_archiver
from {{ cookiecutter.package_name }}.runtime.brokers.memory import MemoryBroker
from {{ cookiecutter.package_name }}.runtime.objectstore import (
    ObjectInfo,
    ObjectStoreSettings,
    ObjectStoreUnavailable,
    ObstoreObjects,
    open_object_store,
)
from {{ cookiecutter.package_name }}.runtime.router import Router
from {{ cookiecutter.package_name }}.runtime.testing import ServiceHarness

from .conftest import RunningLoop

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
