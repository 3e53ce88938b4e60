"""One contract every state store keeps: memory, embedded SQLite, and etcd (when
TEST_ETCD_ENDPOINTS=host:port is set; under CI=true it must be). Template-owned."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from {{ cookiecutter.package_name }}.runtime.config import Settings
from {{ cookiecutter.package_name }}.runtime.state import (
    Fenced,
    MemoryStateStore,
    StateStore,
    open_state_store,
)
from {{ cookiecutter.package_name }}.runtime.state.base import (
    Checkpoint,
    Conflict,
    KeyState,
)

from .conftest import unavailable

StoreFactory = Callable[..., StateStore]


def etcd_url() -> str:
    endpoints = os.environ.get("TEST_ETCD_ENDPOINTS")
    if not endpoints:
        unavailable("TEST_ETCD_ENDPOINTS", "set it (host:port) to run against etcd")
    return f"etcd://{endpoints}"


@pytest.fixture(params=["memory", "sqlite", pytest.param("etcd", marks=pytest.mark.servers)])
async def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """Makes clients of one store; two clients stand for two processes."""
    kind: str = request.param
    group = f"it-state-{uuid.uuid4().hex[:8]}"
    shared_memory: dict[tuple[int, float], MemoryStateStore] = {}
    opened: list[StateStore] = []

    def make(max_ids: int = 1000, ttl_s: float = 3600.0) -> StateStore:
        store: StateStore
        if kind == "memory":
            key = (max_ids, ttl_s)
            store = shared_memory.setdefault(key, MemoryStateStore(max_ids, ttl_s, time.time))
        else:
            url = f"sqlite://{tmp_path / 'state.db'}" if kind == "sqlite" else etcd_url()
            settings = Settings(
                state_url=url, consumer_group=group, dedupe_max_ids=max_ids, dedupe_ttl_s=ttl_s
            )
            store = open_state_store(settings)
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


def ids(records: list[tuple[str, float]]) -> list[str]:
    return [event_id for event_id, _ in records]


async def test_records_outlive_the_client_that_wrote_them(new_store: StoreFactory) -> None:
    writer = new_store()
    await writer.open()
    await writer.commit(Checkpoint("s", ["a", "b"], time.time(), None))
    await writer.close()

    reader = new_store()
    await reader.open()
    assert sorted(ids((await reader.load("s")).records)) == ["a", "b"]
    assert (await reader.load("other")).records == []


async def test_later_loads_return_what_other_writers_added(new_store: StoreFactory) -> None:
    first, second = new_store(), new_store()
    await first.open()
    await second.open()
    await first.commit(Checkpoint("shared", ["a"], time.time(), None))
    cursor = (await second.load("shared")).cursor
    await first.commit(Checkpoint("shared", ["b", "c"], time.time(), None))
    newer = await second.load("shared", after=cursor)
    assert {"b", "c"} <= set(ids(newer.records))


async def test_a_stale_owner_cannot_overwrite_after_a_take_over(new_store: StoreFactory) -> None:
    old_owner, new_owner = new_store(), new_store()
    await old_owner.open()
    await new_owner.open()
    old_token = await old_owner.take_over("partition-0")
    await old_owner.commit(Checkpoint("partition-0", ["a"], time.time(), old_token))

    new_token = await new_owner.take_over("partition-0")  # a rebalance moved the partition
    assert "a" in ids((await new_owner.load("partition-0")).records)  # state handed over
    with pytest.raises(Fenced):
        await old_owner.commit(Checkpoint("partition-0", ["late"], time.time(), old_token))
    await new_owner.commit(Checkpoint("partition-0", ["b"], time.time(), new_token))
    assert "late" not in ids((await new_owner.load("partition-0")).records)


async def test_the_horizon_bounds_what_is_kept(new_store: StoreFactory) -> None:
    store = new_store(max_ids=30, ttl_s=3600)
    await store.open()
    for batch in range(10):
        now = time.time()
        await store.commit(Checkpoint("s", [f"e{batch}-{n}" for n in range(10)], now, None))
    kept = ids((await store.load("s")).records)
    assert 30 <= len(kept) <= 40  # count horizon, at batch granularity
    assert "e9-9" in kept and "e0-0" not in kept


async def test_the_horizon_holds_across_a_restart(new_store: StoreFactory) -> None:
    first = new_store(max_ids=30, ttl_s=3600)
    await first.open()
    for batch in range(5):
        await first.commit(Checkpoint("s", [f"a{batch}-{n}" for n in range(10)], time.time(), None))
    second = new_store(max_ids=30, ttl_s=3600)  # a new process: learns what is kept
    await second.open()
    await second.load("s")
    for batch in range(5):
        await second.commit(
            Checkpoint("s", [f"b{batch}-{n}" for n in range(10)], time.time(), None)
        )
    kept = ids((await second.load("s")).records)
    assert 30 <= len(kept) <= 40
    assert "b4-9" in kept and "a4-9" not in kept


async def test_old_records_expire(new_store: StoreFactory) -> None:
    store = new_store(ttl_s=1.0)
    await store.open()
    await store.commit(Checkpoint("s", ["old"], time.time(), None))
    await asyncio.sleep(1.5)
    assert (await store.load("s")).records == []


async def test_progress_and_key_state_are_committed_with_the_ids(new_store: StoreFactory) -> None:
    writer, reader = new_store(), new_store()
    await writer.open()
    token = await writer.take_over("p")
    state = KeyState(b'{"n":1}', ("a",))
    await writer.commit(Checkpoint("p", ["a"], time.time(), token, progress=7, states={"k": state}))
    await reader.open()
    loaded = await reader.load("p")
    assert (ids(loaded.records), loaded.progress) == (["a"], 7)
    found = await reader.load_states("p", ["k", "missing"])
    assert (found["k"].value, found["k"].applied) == (b'{"n":1}', ("a",))
    assert found["missing"] == KeyState()
    assert (await reader.load("never-written")).progress is None

    emptied = {"k": KeyState(None, ("b",), found["k"].version)}
    await writer.commit(Checkpoint("p", ["b"], time.time(), token, progress=8, states=emptied))
    found = await reader.load_states("p", ["k"])
    assert (found["k"].value, found["k"].applied) == (None, ("b",))


async def test_a_stale_key_state_is_not_overwritten(new_store: StoreFactory) -> None:
    first, second = new_store(), new_store()
    await first.open()
    await second.open()
    read_by_first = (await first.load_states("q", ["k"]))["k"]
    read_by_second = (await second.load_states("q", ["k"]))["k"]
    await second.commit(
        Checkpoint(
            "q",
            ["b"],
            time.time(),
            None,
            states={"k": KeyState(b"2", ("b",), read_by_second.version)},
        )
    )
    with pytest.raises(Conflict):
        await first.commit(
            Checkpoint(
                "q",
                ["a"],
                time.time(),
                None,
                states={"k": KeyState(b"1", ("a",), read_by_first.version)},
            )
        )
    assert (await first.load_states("q", ["k"]))["k"].value == b"2"


async def test_a_large_commit_is_written_whole(new_store: StoreFactory) -> None:
    """Beyond etcd's per-transaction limits (128 operations, 1.5 MiB): the store splits it."""
    store = new_store(max_ids=100_000)
    await store.open()
    token = await store.take_over("big")
    now = time.time()
    processed = [f"{uuid.uuid4()}-{n}" for n in range(30_000)]  # ~1.4 MB of ids
    blob = b'"' + b"x" * 20_000 + b'"'
    states = {f"key-{n}": KeyState(blob, (processed[n],)) for n in range(300)}  # ~6 MB
    await store.commit(Checkpoint("big", processed, now, token, progress=30_000, states=states))
    loaded = await store.load("big")
    assert (len(loaded.records), loaded.progress) == (30_000, 30_000)
    found = await store.load_states("big", list(states))
    assert all(found[key].value == blob for key in states)


@pytest.mark.servers
async def test_etcd_sends_a_commits_key_states_at_once_and_the_ids_after_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """etcd takes 64 writes per transaction: a group's key states are split, and those
    transactions are sent together (one round trip, not one per 64 keys); its ids only
    once every state is written, the progress last. Reading many keys is one round trip
    too."""
    from {{ cookiecutter.package_name }}.runtime.state.etcd import EtcdStateStore

    settings = Settings(state_url=etcd_url(), consumer_group=f"it-state-{uuid.uuid4().hex[:8]}")
    store = open_state_store(settings)
    assert isinstance(store, EtcdStateStore)
    journal: list[str] = []
    in_flight = 0
    most_in_flight = 0
    write = EtcdStateStore._write
    call = EtcdStateStore._call

    async def journaled_write(self: EtcdStateStore, client: Any, *args: Any) -> None:
        kinds = "".join(sorted({_kind(put) for put in args[1]}))
        journal.append(f"start {kinds}")
        await write(self, client, *args)
        journal.append(f"end {kinds}")

    async def counted_call(self: EtcdStateStore, step: Any, *args: Any) -> Any:
        nonlocal in_flight, most_in_flight
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        try:
            return await call(self, step, *args)
        finally:
            in_flight -= 1

    monkeypatch.setattr(EtcdStateStore, "_write", journaled_write)
    await store.open()
    try:
        token = await store.take_over("s")
        states = {f"key-{n}": KeyState(b'{"n":1}', (f"e-{n}",)) for n in range(200)}
        processed = [f"e-{n}" for n in range(200)]
        await store.commit(
            Checkpoint("s", processed, time.time(), token, progress=9, states=states)
        )
        starts = [entry for entry in journal if entry.startswith("start")]
        first_end = next(n for n, entry in enumerate(journal) if entry.startswith("end"))
        assert journal[:first_end] == ["start s"] * 3  # 192 of the 200 states at once
        assert journal[-2:] == ["start ips", "end ips"]  # 8 states, the ids, the progress
        assert len(starts) == 4
        monkeypatch.setattr(EtcdStateStore, "_call", counted_call)
        found = await store.load_states("s", list(states))
        assert all(state.value == b'{"n":1}' for state in found.values())
        assert most_in_flight == 4  # 200 keys: four transactions, sent at once
    finally:
        await store.close()


def _kind(put: Any) -> str:
    """A key state (s), the stream's progress (p), or a record of ids (i)."""
    return "s" if put.state_of else "p" if put.key.endswith(b"/progress") else "i"
