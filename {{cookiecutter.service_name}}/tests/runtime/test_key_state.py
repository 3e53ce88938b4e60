"""Per-key handler state (`ctx.state`) and checkpointed progress. Template-owned."""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pytest
from google.protobuf.wrappers_pb2 import StringValue
from hypothesis import given, settings
from hypothesis import strategies as st

from {{ cookiecutter.package_name }}.runtime import Context, DeadLetter, RetryLater, Router
from {{ cookiecutter.package_name }}.runtime.brokers.memory import MemoryBus
from {{ cookiecutter.package_name }}.runtime.loop import MAX_STATE_BYTES
from {{ cookiecutter.package_name }}.runtime.state.base import Checkpoint, KeyState
from {{ cookiecutter.package_name }}.runtime.state.encoding import decode_json, encode_json
from {{ cookiecutter.package_name }}.runtime.state.memory import MemoryStateStore
from {{ cookiecutter.package_name }}.runtime.testing import ServiceHarness

from .conftest import FAST, GatedBroker, RunningLoop, fast_settings, make_loop, publish_to


def counting_router(seen: list[tuple[str, int]]) -> Router:
    """Counts events per key in ctx.state; "flaky" fails its first attempt after writing
    to the state, "dead" is dead-lettered after writing to it, "set" stores a set."""
    router = Router()

    @router.handles(StringValue, stateful=True)
    async def count(event: StringValue, ctx: Context) -> None:
        ctx.state["count"] = ctx.state.get("count", 0) + 1
        if event.value == "flaky" and ctx.attempt == 1:
            raise RetryLater("first attempt fails after touching the state")
        if event.value == "dead":
            raise DeadLetter("refused", "after touching the state")
        if event.value == "set":
            ctx.state["bad"] = {1, 2}
        seen.append((ctx.envelope.subject, ctx.state["count"]))

    return router


async def test_state_is_kept_per_key_across_restarts() -> None:
    seen: list[tuple[str, int]] = []
    service = ServiceHarness(counting_router(seen), **FAST)
    for key in ("a", "a", "b"):
        await service.publish(StringValue(value="x"), key=key)
    await service.run_until_idle()
    await service.publish(StringValue(value="x"), key="a")  # a new loop: state from the store
    await service.run_until_idle()

    assert seen == [("a", 1), ("a", 2), ("b", 1), ("a", 3)]
    assert await service.state_of("a") == {"count": 3}
    assert await service.state_of("b") == {"count": 1}


async def test_failed_attempts_and_dead_letters_leave_no_trace_in_the_state() -> None:
    seen: list[tuple[str, int]] = []
    service = ServiceHarness(counting_router(seen), **FAST)
    for value in ("flaky", "dead", "x"):
        await service.publish(StringValue(value=value), key="k")

    stats = await service.run_until_idle()

    assert stats.retries == 1
    assert [parked.reason for parked in service.dead_letters] == ["refused"]
    assert seen == [("k", 1), ("k", 2)]  # the retry started from the state before "flaky"
    assert await service.state_of("k") == {"count": 2}


async def test_state_that_is_not_json_is_dead_lettered_with_a_clear_reason() -> None:
    service = ServiceHarness(counting_router([]), **FAST)
    await service.publish(StringValue(value="set"), key="k")

    await service.run_until_idle()

    [parked] = service.dead_letters
    assert parked.reason == "handler-failed"
    assert "ctx.state must hold JSON values" in parked.error
    assert await service.state_of("k") == {}


async def test_state_over_the_limit_is_dead_lettered_with_its_own_reason() -> None:
    router = Router()

    @router.handles(StringValue, stateful=True)
    async def hoard(event: StringValue, ctx: Context) -> None:
        ctx.state["blob"] = "x" * MAX_STATE_BYTES

    service = ServiceHarness(router, **FAST)
    await service.publish(StringValue(value="x"), key="k")
    await service.run_until_idle()

    [parked] = service.dead_letters
    assert parked.reason == "state-too-large"
    assert f"the limit is {MAX_STATE_BYTES}" in parked.error
    assert await service.state_of("k") == {}


async def test_state_without_stateful_tells_how_to_fix_it() -> None:
    router = Router()

    @router.handles(StringValue)
    async def forgetful(event: StringValue, ctx: Context) -> None:
        ctx.state["x"] = 1

    service = ServiceHarness(router, **{**FAST, "retry_attempts": 1})
    await service.publish(StringValue(value="x"), key="k")
    await service.run_until_idle()

    [parked] = service.dead_letters
    assert "stateful=True" in parked.error


@dataclass
class Rig:
    """A memory bus and store with the counting router bound: one replica's world."""

    store: MemoryStateStore
    bus: MemoryBus = field(default_factory=MemoryBus)
    seen: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.settings = fast_settings()
        self.group = self.settings.consumer_group
        self.router = counting_router(self.seen)
        self.bus.bind(self.group, self.router.event_types())

    def start(self, *, exclusive: bool = False, hang_acks: bool = False) -> RunningLoop:
        broker = GatedBroker(self.bus, self.group, exclusive=exclusive)
        broker.hang_acks = hang_acks
        return RunningLoop(make_loop(self.router, self.bus, self.store, self.settings, broker))


async def test_checkpointed_progress_skips_what_a_crash_left_unacked() -> None:
    """Exclusive streams (Kafka partitions): a crash after the checkpoint but before the
    ack redelivers the batch; its progress says it is done. Without it, poison (which has
    no event id to dedupe on) would be dead-lettered a second time."""
    rig = Rig(MemoryStateStore(1000, 3600, time.time))
    bus, store, seen, router, group = rig.bus, rig.store, rig.seen, rig.router, rig.group
    settings = rig.settings
    encoder = ServiceHarness(router)
    encoder.publish_raw(b"\x00\xffpoison", settings.topic_for(router.event_types()[0]))
    bus.put(encoder.bus.published[-1])
    await publish_to(bus, router, StringValue(value="x"), key="k")

    first = rig.start(exclusive=True, hang_acks=True)
    await first.wait_until(lambda: store.commits == 1)
    await first.crash()
    assert bus.pending(group) == 2  # nothing was acked

    second = rig.start(exclusive=True)
    await second.wait_until(lambda: bus.pending(group) == 0)
    stats = await second.stop_gracefully()

    assert (stats.handled, stats.duplicates, sum(stats.dead_lettered.values())) == (0, 2, 0)
    assert len([message for message in bus.published if message.dead_letter]) == 1
    assert seen == [("k", 1)]


class StateFirstStore(MemoryStateStore):
    """Writes a commit's key state, then dies before the rest, as a store that must split
    a large commit into several transactions could."""

    crash_after_states = True

    async def commit(self, checkpoint: Checkpoint) -> None:
        if self.crash_after_states and checkpoint.states:
            await super().commit(replace(checkpoint, ids=(), progress=None))
            await asyncio.Event().wait()  # killed here
        await super().commit(checkpoint)


@pytest.mark.parametrize("exclusive", [False, True])
async def test_a_split_commit_cut_short_does_not_apply_an_event_twice(exclusive: bool) -> None:
    store = StateFirstStore(1000, 3600, time.time)
    rig = Rig(store)
    bus, seen, router, group = rig.bus, rig.seen, rig.router, rig.group
    await publish_to(bus, router, StringValue(value="x"), key="k")

    first = rig.start(exclusive=exclusive)
    await first.wait_until(lambda: bool(seen))
    await asyncio.sleep(0.05)
    await first.crash()
    assert await store.load_states(group, ["k"]) != {"k": KeyState()}  # state written
    assert (await store.load(group)).records == []  # ids not

    store.crash_after_states = False
    second = rig.start(exclusive=exclusive)
    await second.wait_until(lambda: bus.pending(group) == 0)
    stats = await second.stop_gracefully()

    assert (stats.handled, stats.duplicates) == (0, 1)
    assert seen == [("k", 1)]
    [(event_id, _)] = (await store.load(group)).records  # recorded now
    assert event_id in (await store.load_states(group, ["k"]))["k"].applied


class RacedStore(MemoryStateStore):
    """Just before this replica's first commit, another replica commits key k."""

    raced = False

    async def commit(self, checkpoint: Checkpoint) -> None:
        if not self.raced:
            self.raced = True
            newer = {"k": KeyState(b'{"count":41}', ("other",), 0)}
            await super().commit(
                Checkpoint(checkpoint.stream, ["other"], time.time(), states=newer)
            )
        await super().commit(checkpoint)


async def test_a_replica_that_read_stale_state_does_not_overwrite_it() -> None:
    """Shared streams: the commit compares each key's version; a replica that read an
    older one must not overwrite it. Its batch goes back to the queue and runs again on
    the newer state."""
    store = RacedStore(1000, 3600, time.time)
    rig = Rig(store)
    bus, seen, router, group = rig.bus, rig.seen, rig.router, rig.group
    await publish_to(bus, router, StringValue(value="x"), key="k")

    running = rig.start()
    await running.wait_until(lambda: bus.pending(group) == 0)
    stats = await running.stop_gracefully()

    assert stats.fenced == 1
    assert seen == [("k", 1), ("k", 42)]  # re-run on the newer state; applied once
    assert (await store.load_states(group, ["k"]))["k"].value == b'{"count":42}'


async def test_a_group_of_batches_writes_each_key_once_naming_every_event_applied() -> None:
    """Group commit on an exclusive stream: batches handled while the last group is written
    share one write; a key's state in it is the latest, applied by all their events."""
    rig = Rig(MemoryStateStore(1000, 3600, time.time))
    rig.settings = fast_settings(batch_size=2, commit_interval_ms=600_000)
    bus, store, seen, router, group = rig.bus, rig.store, rig.seen, rig.router, rig.group
    ids = [await publish_to(bus, router, StringValue(value="x"), key="k") for _ in range(6)]

    running = rig.start(exclusive=True)
    await running.wait_until(lambda: len(seen) == 6)
    assert store.commits == 1  # the first batch; the next two wait for the interval
    await running.stop_gracefully()

    assert store.commits == 2
    assert seen == [("k", count) for count in range(1, 7)]
    stored = (await store.load_states(group, ["k"]))["k"]
    assert stored.value == b'{"count":6}'
    assert stored.applied == tuple(ids[2:])
    assert [event_id for event_id, _ in (await store.load(group)).records] == ids


@pytest.mark.parametrize("exclusive", [False, True])
async def test_reading_a_key_waits_only_for_batches_that_changed_it(exclusive: bool) -> None:
    """A key's state is read from the store without waiting for earlier batches to be
    durable, unless one of them changed that key (the store is then behind on it): acks
    that never end hold back only the key they changed. An exclusive stream's owner
    handles that key from what it holds."""
    rig = Rig(MemoryStateStore(1000, 3600, time.time))
    rig.settings = fast_settings(batch_size=1)
    bus, seen, router = rig.bus, rig.seen, rig.router
    for key in ("a", "b", "c"):
        await publish_to(bus, router, StringValue(value="x"), key=key)

    running = rig.start(exclusive=exclusive, hang_acks=True)  # nothing becomes durable
    await running.wait_until(lambda: len(seen) == 3)
    await publish_to(bus, router, StringValue(value="x"), key="a")
    if exclusive:
        await running.wait_until(lambda: len(seen) == 4)
    else:
        await asyncio.sleep(0.3)  # a shared stream reads it again: after "a" is durable
    await running.crash()

    assert seen == [("a", 1), ("b", 1), ("c", 1), *([("a", 2)] if exclusive else [])]


# JSON values as handlers keep them: any float but NaN and infinity, ints of any size.
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(database=None, deadline=None)  # no .hypothesis/ folder; speed is not under test
@given(JSON_VALUES)
def test_state_json_reads_back_what_the_standard_library_would(value: Any) -> None:
    strict = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    assert decode_json(encode_json(value)) == json.loads(strict)


@pytest.mark.parametrize(
    "value",
    [{"n": math.nan}, {"n": [math.inf]}, {"s": {1, 2}}, {"at": datetime.now(UTC)}, {"o": object()}],
)
def test_state_json_refuses_what_is_no_json_value(value: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        encode_json(value)


def test_state_json_takes_int_keys_and_big_ints_as_the_standard_library_does() -> None:
    assert decode_json(encode_json({1: 2**70, 2: None})) == {"1": 2**70, "2": None}
    big = {"n": [2**64 + 1, -(2**63) - 1, 2**63, 10**40]}  # orjson reads these as floats
    assert decode_json(encode_json(big)) == big
    assert all(isinstance(n, int) for n in decode_json(encode_json(big))["n"])


def test_state_json_writes_text_the_same_way_whether_or_not_it_holds_a_null() -> None:
    """A None (written as null, as NaN would be) does not change how the rest is written,
    nor so the size the state limit counts."""
    with_none = encode_json({"note": "café", "gone": None})
    without = encode_json({"note": "café"})
    assert "café".encode() in with_none and "café".encode() in without
