"""The loop's guarantees on the in-memory bus (DESIGN §3). Template-owned; do not edit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence

import pytest
from google.protobuf.wrappers_pb2 import Int64Value, StringValue

from {{ cookiecutter.package_name }}.runtime import Context, DeadLetter, RetryLater, Router
from {{ cookiecutter.package_name }}.runtime.brokers.base import (
    DLQ_ORIGIN,
    DLQ_REASON,
    InboundMessage,
    OnRevoked,
)
from {{ cookiecutter.package_name }}.runtime.brokers.memory import MemoryBroker, MemoryBus
from {{ cookiecutter.package_name }}.runtime.config import Settings
from {{ cookiecutter.package_name }}.runtime.envelope import derive_event_id
from {{ cookiecutter.package_name }}.runtime.loop import MAX_GROUP_MESSAGES
from {{ cookiecutter.package_name }}.runtime.reaction import Reaction
from {{ cookiecutter.package_name }}.runtime.state.base import Checkpoint, Fence, Fenced
from {{ cookiecutter.package_name }}.runtime.state.memory import MemoryStateStore
from {{ cookiecutter.package_name }}.runtime.streams import RESTORES_AT_ONCE, Streams
from {{ cookiecutter.package_name }}.runtime.testing import ServiceHarness

from .conftest import (
    FAST,
    GatedBroker,
    Journal,
    JournalingBroker,
    RunningLoop,
    fast_settings,
    make_loop,
    publish_to,
)


def echo_router(handled: list[str]) -> Router:
    """Handles StringValue commands; emits Int64Value(len(value)) for plain values."""
    router = Router()

    @router.handles(StringValue)
    async def handle(event: StringValue, ctx: Context) -> None:
        if event.value == "dead":
            raise DeadLetter("bad-command", "asked to")
        if event.value.startswith("flaky") and ctx.attempt < 3:
            raise RetryLater(f"attempt {ctx.attempt}")
        if event.value == "broken":
            raise ValueError("always fails")
        handled.append(event.value)
        ctx.emit(Int64Value(value=len(event.value)))
        ctx.emit(Int64Value(value=-len(event.value)), key="other")

    return router


def echo_bus() -> tuple[MemoryBus, Settings, list[str], Router]:
    """A memory bus bound for the echo router, with its settings and the values handled."""
    handled: list[str] = []
    bus, settings, router = MemoryBus(), fast_settings(), echo_router(handled)
    bus.bind(settings.consumer_group, router.event_types())
    return bus, settings, handled, router


def harness(handled: list[str], **settings: object) -> ServiceHarness:
    return ServiceHarness(echo_router(handled), **{**FAST, **settings})


async def test_ack_comes_after_publish_and_checkpoint() -> None:
    bus, settings, handled, router = echo_bus()
    journal = Journal()

    class JournalingStore(MemoryStateStore):
        async def commit(self, checkpoint: Checkpoint) -> None:
            await super().commit(checkpoint)
            journal.entries.append("checkpoint")

    for value in ("a", "b", "c"):
        await publish_to(bus, router, StringValue(value=value))
    store = JournalingStore(1000, 3600, time.time)
    broker = JournalingBroker(bus, settings.consumer_group, journal)
    running = RunningLoop(make_loop(router, bus, store, settings, broker))
    await running.wait_until(lambda: bus.pending(settings.consumer_group) == 0)
    await running.stop_gracefully()

    assert sorted(handled) == ["a", "b", "c"]
    # Every ack is preceded by the publish of what its batch emitted and by a checkpoint.
    acks = [i for i, entry in enumerate(journal.entries) if entry.startswith("ack")]
    for index in acks:
        assert journal.entries[index - 1] == "checkpoint"
        assert journal.entries[index - 2].startswith("publish:")
    assert len(bus.messages("google.protobuf.Int64Value")) == 6


async def test_next_batch_is_handled_while_the_last_is_made_durable() -> None:
    """The next batch is handled while the last group is being checkpointed, knows
    its ids already (the same event again is a duplicate), and nothing is acked before its
    own checkpoint."""
    bus, settings, handled, router = echo_bus()
    release = asyncio.Event()
    commits = 0

    class SlowStore(MemoryStateStore):
        async def commit(self, checkpoint: Checkpoint) -> None:
            nonlocal commits
            commits += 1
            await release.wait()
            await super().commit(checkpoint)

    first = await publish_to(bus, router, StringValue(value="first"))
    running = RunningLoop(make_loop(router, bus, SlowStore(1000, 3600, time.time), settings))
    await running.wait_until(lambda: commits == 1)  # first handled; its checkpoint waits
    await publish_to(bus, router, StringValue(value="first"), event_id=first)
    await publish_to(bus, router, StringValue(value="second"))
    await running.wait_until(lambda: handled == ["first", "second"])
    assert running.loop.stats.received == 3
    assert bus.pending(settings.consumer_group) == 3  # handled, none acked
    release.set()
    await running.wait_until(lambda: bus.pending(settings.consumer_group) == 0)
    stats = await running.stop_gracefully()
    assert handled == ["first", "second"]
    assert stats.duplicates == 1


async def test_the_next_group_publishes_while_the_last_is_checkpointed() -> None:
    """Group commit is pipelined: a group's emitted events go out while the group before
    it is being checkpointed; its own checkpoint and ack wait for that group's ack."""
    bus, settings, handled, router = echo_bus()
    journal = Journal()
    release = asyncio.Event()

    class HeldStore(MemoryStateStore):
        async def commit(self, checkpoint: Checkpoint) -> None:
            journal.entries.append("checkpoint begins")
            await release.wait()
            await super().commit(checkpoint)
            journal.entries.append("checkpoint")

    await publish_to(bus, router, StringValue(value="first"))
    broker = JournalingBroker(bus, settings.consumer_group, journal)
    store = HeldStore(1000, 3600, time.time)
    running = RunningLoop(make_loop(router, bus, store, settings, broker))
    await running.wait_until(lambda: "checkpoint begins" in journal.entries)
    await publish_to(bus, router, StringValue(value="second"))
    # The second group's events are confirmed while the first group's checkpoint is held.
    await running.wait_until(lambda: journal.entries.count("publish:2") == 2)
    assert journal.entries == ["publish:2", "checkpoint begins", "publish:2"]
    assert bus.pending(settings.consumer_group) == 2  # nothing acked
    release.set()
    await running.wait_until(lambda: bus.pending(settings.consumer_group) == 0)
    await running.stop_gracefully()
    assert handled == ["first", "second"]
    assert journal.entries[3:] == [
        "checkpoint",
        "ack:1",
        "checkpoint begins",
        "checkpoint",
        "ack:1",
    ]


class CountingStore(MemoryStateStore):
    """Counts its commits (one per stream per group of batches)."""

    def __init__(self) -> None:
        super().__init__(100_000, 3600, time.time)
        self.commits_seen = 0

    async def commit(self, checkpoint: Checkpoint) -> None:
        await super().commit(checkpoint)
        self.commits_seen += 1


async def test_batches_handled_within_the_interval_are_made_durable_together() -> None:
    """Group commit: a group is written once COMMIT_INTERVAL_MS passed since the last one
    began, or at once when it holds MAX_GROUP_MESSAGES messages; a stop writes it now."""
    bus, _, handled, router = echo_bus()
    size = MAX_GROUP_MESSAGES // 4
    settings = fast_settings(batch_size=size, commit_interval_ms=600_000)
    journal = Journal()
    store = CountingStore()
    broker = JournalingBroker(bus, settings.consumer_group, journal)
    for number in range(size * (1 + 4 + 3)):
        await publish_to(bus, router, StringValue(value=f"v{number}"))
    running = RunningLoop(make_loop(router, bus, store, settings, broker))

    # The first batch at once (no write before it), then a full group; the rest waits.
    await running.wait_until(lambda: len(handled) == size * (1 + 4 + 3))
    await running.wait_until(lambda: store.commits_seen == 2)
    assert bus.pending(settings.consumer_group) == 3 * size
    acks = [entry for entry in journal.entries if entry.startswith("ack")]
    assert acks == [f"ack:{size}", f"ack:{MAX_GROUP_MESSAGES}"]

    async with asyncio.timeout(10):  # the stop does not wait out the interval
        stats = await running.stop_gracefully()
    assert bus.pending(settings.consumer_group) == 0
    acks = [entry for entry in journal.entries if entry.startswith("ack")]
    assert acks[-1] == f"ack:{3 * size}"
    assert store.commits_seen == 3
    assert stats.acked == stats.handled == len(handled)
    # Every event's id was recorded: a redelivery of any of them is a duplicate.
    records = (await store.load(settings.consumer_group)).records
    assert len(records) == len(handled)


async def test_a_batch_fills_until_the_next_group_may_be_written() -> None:
    """After a quiet spell the first message is handled and acked at once; the messages
    after it gather into one batch until the next group may be written (here not before
    the stop, COMMIT_INTERVAL_MS being ten minutes)."""
    bus, _, handled, router = echo_bus()
    settings = fast_settings(batch_size=5, commit_interval_ms=600_000)
    journal = Journal()
    broker = JournalingBroker(bus, settings.consumer_group, journal)
    running = RunningLoop(make_loop(router, bus, CountingStore(), settings, broker))
    await running.wait_started()

    await publish_to(bus, router, StringValue(value="first"))
    await running.wait_until(lambda: "ack:1" in journal.entries)
    for number in range(4):  # trickling in: one batch, handled once full
        await publish_to(bus, router, StringValue(value=f"v{number}"))
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert handled == ["first"]
    await publish_to(bus, router, StringValue(value="v4"))
    await running.wait_until(lambda: len(handled) == 6)
    assert running.loop.stats.batches == 2

    async with asyncio.timeout(10):
        await running.stop_gracefully()
    acks = [entry for entry in journal.entries if entry.startswith("ack")]
    assert acks == ["ack:1", "ack:5"]


async def test_a_bus_that_limits_unacked_deliveries_is_not_kept_waiting() -> None:
    """With RabbitMQ's prefetch, a group waiting out the interval would stop deliveries:
    a group is written as soon as the bus could not deliver another batch beside it."""
    bus, _, handled, router = echo_bus()
    settings = fast_settings(batch_size=5, commit_interval_ms=600_000)
    store = CountingStore()
    broker = MemoryBroker(bus, settings.consumer_group, max_unacked=10)
    for number in range(30):
        await publish_to(bus, router, StringValue(value=f"v{number}"))
    running = RunningLoop(make_loop(router, bus, store, settings, broker))

    await running.wait_until(lambda: bus.pending(settings.consumer_group) == 0)
    await running.stop_gracefully()
    assert len(handled) == 30


def test_a_stream_taken_over_between_two_batches_is_not_written_in_one_group() -> None:
    """A group's write presents one fence per stream: a batch handled under a newer fence
    (the stream was given up and taken over again) starts a group of its own."""
    first = Reaction(fences={"t:0": Fence("t:0", 1), "t:1": None})
    assert first.joins(Reaction(fences={"t:0": Fence("t:0", 1)}))
    assert first.joins(Reaction(fences={"t:2": Fence("t:2", 7)}))
    assert not first.joins(Reaction(fences={"t:0": Fence("t:0", 2)}))
    assert not first.joins(Reaction(fences={"t:1": Fence("t:1", 3)}))


async def test_no_more_than_two_full_groups_wait_unacked(monkeypatch: pytest.MonkeyPatch) -> None:
    """What may run again after a crash stays within two full groups and a batch (the
    documented bound), however the pipelined groups were cut: here by fences (a stream
    taken over between batches), while the first group's checkpoint is held."""
    group_limit = "{{ cookiecutter.package_name }}.runtime.groupcommit.MAX_GROUP_MESSAGES"
    monkeypatch.setattr(group_limit, 4)
    release = asyncio.Event()

    class HeldStore(MemoryStateStore):
        async def commit(self, checkpoint: Checkpoint) -> None:
            await release.wait()

    bus, router = MemoryBus(), echo_router([])
    settings = fast_settings(batch_size=1, commit_interval_ms=60_000)
    loop = make_loop(router, bus, HeldStore(1000, 3600, time.time), settings)
    group_commit = loop.group_commit
    accepted = 0
    # Group 1 full (held in its checkpoint), group 2 cut short by a new fence, group 3.
    for token in [1] * 4 + [2] * 3 + [3] * 4:
        reaction = Reaction(fences={"s": Fence("s", token)})
        reaction.processed["s"].append(f"id-{accepted}")
        message = InboundMessage(b"", "t", "s", accepted)
        adding = asyncio.ensure_future(group_commit.add([message], reaction))
        accepted += 1
        for _ in range(20):  # let every write run until it waits
            await asyncio.sleep(0)
        if not adding.done():
            break  # the loop waits here: no more batches are fetched
    try:
        assert accepted <= 2 * 4 + settings.batch_size
    finally:
        await group_commit.abandon()
        adding.cancel()


async def test_a_batch_handled_behind_a_fenced_checkpoint_is_not_acked() -> None:
    """The checkpoint of the first batch is refused (a newer owner) while the next batch
    was already handled: neither is acked, the loop rejoins, and both run again."""
    bus, settings, handled, router = echo_bus()
    release = asyncio.Event()
    refused = False

    class UsurpedStore(MemoryStateStore):
        async def commit(self, checkpoint: Checkpoint) -> None:
            nonlocal refused
            if not refused:
                await release.wait()
                refused = True
                raise Fenced(checkpoint.stream)
            await super().commit(checkpoint)

    await publish_to(bus, router, StringValue(value="first"))
    broker = MemoryBroker(bus, settings.consumer_group, exclusive=True)
    store = UsurpedStore(1000, 3600, time.time)
    running = RunningLoop(make_loop(router, bus, store, settings, broker))
    await running.wait_until(lambda: handled == ["first"])
    await publish_to(bus, router, StringValue(value="second"))
    await running.wait_until(lambda: handled == ["first", "second"])
    assert bus.pending(settings.consumer_group) == 2  # handled, none acked
    release.set()
    await running.wait_until(lambda: bus.pending(settings.consumer_group) == 0)
    stats = await running.stop_gracefully()
    assert stats.fenced == 1
    assert sorted(handled) == ["first", "first", "second", "second"]
    assert stats.acked == 2


async def test_a_stream_given_up_while_its_batch_is_handled_does_not_stop_the_loop() -> None:
    """A rebalance whose drain deadline passed gives the stream up while a handler still
    runs: the batch finishes (a newer owner's fence or dedupe deals with it) and the loop
    goes on with what comes next."""
    bus = MemoryBus()
    settings = fast_settings()
    handled: list[str] = []
    router = Router()

    class RevokingBroker(MemoryBroker):
        """Keeps the loop's `on_revoked`, as the Kafka adapter does."""

        on_revoked: OnRevoked | None = None

        async def start(self, topics: Sequence[str], on_revoked: OnRevoked | None = None) -> None:
            self.on_revoked = on_revoked
            await super().start(topics, on_revoked)

    broker = RevokingBroker(bus, settings.consumer_group)

    @router.handles(StringValue)
    async def handle(event: StringValue, ctx: Context) -> None:
        if event.value == "given up meanwhile":
            revoked = broker.on_revoked
            assert revoked is not None
            revoked({settings.consumer_group})  # as the Kafka adapter does after a drain
        handled.append(event.value)

    bus.bind(settings.consumer_group, router.event_types())
    await publish_to(bus, router, StringValue(value="given up meanwhile"))
    store = MemoryStateStore(1000, 3600, time.time)
    running = RunningLoop(make_loop(router, bus, store, settings, broker))
    await running.wait_until(lambda: bus.pending(settings.consumer_group) == 0)
    await publish_to(bus, router, StringValue(value="next"))
    await running.wait_until(lambda: handled == ["given up meanwhile", "next"])
    stats = await running.stop_gracefully()
    assert stats.acked == 2


async def test_unfinished_handler_is_redelivered_after_a_crash() -> None:
    bus = MemoryBus()
    store = MemoryStateStore(1000, 3600, time.time)
    settings = fast_settings()
    started = asyncio.Event()
    release = asyncio.Event()
    runs: list[str] = []
    router = Router()

    @router.handles(StringValue)
    async def slow(event: StringValue, ctx: Context) -> None:
        runs.append(ctx.event_id)
        started.set()
        await release.wait()

    bus.bind(settings.consumer_group, router.event_types())
    event_id = await publish_to(bus, router, StringValue(value="x"))

    first = RunningLoop(make_loop(router, bus, store, settings))
    await asyncio.wait_for(started.wait(), 5)
    await first.crash()
    assert bus.pending(settings.consumer_group) == 1  # not acked: it comes back
    assert bus.queue(settings.consumer_group).ready[0].redelivered

    release.set()
    second = RunningLoop(make_loop(router, bus, store, settings))
    await second.wait_until(lambda: bus.pending(settings.consumer_group) == 0)
    stats = await second.stop_gracefully()
    assert runs == [event_id, event_id]  # the in-flight event re-ran once, then was acked
    assert stats.handled == 1


async def test_duplicates_are_dropped_within_a_batch_and_across_restarts() -> None:
    handled: list[str] = []
    service = harness(handled)
    event_id = await service.publish(StringValue(value="once"))
    await service.publish(StringValue(value="once"), event_id=event_id)
    stats = await service.run_until_idle()
    assert (stats.handled, stats.duplicates) == (1, 1)

    # A later redelivery (new loop: the window is restored from the state store).
    await service.publish(StringValue(value="once"), event_id=event_id)
    stats = await service.run_until_idle()
    assert (stats.handled, stats.duplicates) == (0, 1)
    assert handled == ["once"]


async def test_dedupe_horizon_is_bounded_by_count() -> None:
    handled: list[str] = []
    service = harness(handled, dedupe_max_ids=2)
    first = await service.publish(StringValue(value="a"))
    await service.publish(StringValue(value="b"))
    await service.publish(StringValue(value="c"))
    await service.run_until_idle()
    await service.publish(StringValue(value="a"), event_id=first)  # beyond the horizon
    await service.run_until_idle()
    assert handled == ["a", "b", "c", "a"]


async def test_dedupe_horizon_is_bounded_by_age() -> None:
    handled: list[str] = []
    service = harness(handled, dedupe_ttl_s=0.05)
    event_id = await service.publish(StringValue(value="a"))
    await service.run_until_idle()
    await asyncio.sleep(0.1)
    await service.publish(StringValue(value="a"), event_id=event_id)
    await service.run_until_idle()
    assert handled == ["a", "a"]


async def test_emitted_ids_derive_from_the_source_id_and_position() -> None:
    service = harness([])
    event_id = await service.publish(StringValue(value="abc"), key="k")
    await service.run_until_idle()
    emitted = service.emitted(Int64Value)
    assert [e.id for e in emitted] == [derive_event_id(event_id, 0), derive_event_id(event_id, 1)]
    assert [e.subject for e in emitted] == ["k", "other"]
    assert all(e.extensions["causationid"] == event_id for e in emitted)

    # The same source event handled by a fresh service emits the same ids again.
    again = harness([])
    await again.publish(StringValue(value="abc"), key="k", event_id=event_id)
    await again.run_until_idle()
    assert [e.id for e in again.emitted(Int64Value)] == [e.id for e in emitted]


async def test_bad_input_is_dead_lettered_with_a_reason_and_acked() -> None:
    handled: list[str] = []
    service = harness(handled, max_message_bytes=1000)
    topic = "google.protobuf.StringValue"
    service.publish_raw(b"\x00\xffnot protobuf", topic)
    service.publish_raw(b"", topic)  # parses, but has no id/type/specversion
    service.publish_raw(b"y" * 1001, topic)
    await service.publish(Int64Value(value=1), topic=topic)  # nobody handles Int64Value
    await service.publish(
        Int64Value(value=1), event_type="google.protobuf.StringValue", topic=topic
    )  # says StringValue, carries Int64Value
    await service.publish(StringValue(value="dead"))
    await service.publish(StringValue(value="fine"))

    stats = await service.run_until_idle()

    reasons = sorted(parked.reason for parked in service.dead_letters)
    assert reasons == [
        "bad-command",
        "invalid-envelope",
        "oversized",
        "schema-mismatch",
        "undecodable",
        "unknown-type",
    ]
    assert handled == ["fine"]
    assert stats.acked == 7
    assert service.bus.pending(service.group) == 0
    poison = next(p for p in service.dead_letters if p.reason == "undecodable")
    assert poison.body == b"\x00\xffnot protobuf"  # original bytes kept
    assert poison.headers[DLQ_ORIGIN].startswith(topic + "|")
    assert sum(stats.dead_lettered.values()) == 6


async def test_transient_errors_are_retried_then_succeed() -> None:
    handled: list[str] = []
    service = harness(handled)
    await service.publish(StringValue(value="flaky"))
    stats = await service.run_until_idle()
    assert handled == ["flaky"]
    assert stats.retries == 2
    assert service.dead_letters == []


async def test_persistent_errors_are_dead_lettered_after_the_attempts() -> None:
    service = harness([], retry_attempts=3)
    await service.publish(StringValue(value="broken"))
    stats = await service.run_until_idle()
    [parked] = service.dead_letters
    assert parked.reason == "handler-failed"
    assert "ValueError: always fails" in parked.error
    assert stats.retries == 2
    assert service.emitted() == []  # emits of a failed handler are never published


async def test_dead_letter_exception_skips_retries() -> None:
    service = harness([])
    await service.publish(StringValue(value="dead"))
    stats = await service.run_until_idle()
    assert stats.retries == 0
    assert [p.headers[DLQ_REASON] for p in service.dead_letters] == ["bad-command"]


class Overlap:
    """How many handlers run at once, and the most that ever did."""

    def __init__(self) -> None:
        self.active = 0
        self.most = 0

    async def run(self, work: Awaitable[None]) -> None:
        self.active += 1
        self.most = max(self.most, self.active)
        try:
            await work
        finally:
            self.active -= 1


async def test_same_key_in_order_different_keys_concurrently() -> None:
    order: dict[str, list[int]] = {"a": [], "b": []}
    overlap = Overlap()
    router = Router()

    @router.handles(StringValue)
    async def handle(event: StringValue, ctx: Context) -> None:
        key, number = event.value.split(":")
        # Later events may finish first.
        await overlap.run(asyncio.sleep(0.002 * (int(number) % 3)))
        order[key].append(int(number))

    service = ServiceHarness(router, **FAST)
    for number in range(20):
        for key in ("a", "b"):
            await service.publish(StringValue(value=f"{key}:{number}"), key=key)
    await service.run_until_idle()
    assert order == {"a": list(range(20)), "b": list(range(20))}
    assert overlap.most == 2


async def test_keys_handled_at_once_stay_within_max_concurrency() -> None:
    overlap = Overlap()
    router = Router()

    @router.handles(StringValue)
    async def handle(event: StringValue, ctx: Context) -> None:
        await overlap.run(asyncio.sleep(0.002))

    service = ServiceHarness(router, **{**FAST, "max_concurrency": 3})
    for number in range(12):
        await service.publish(StringValue(value=str(number)), key=f"key-{number}")
    stats = await service.run_until_idle()
    assert stats.handled == 12
    assert overlap.most == 3


async def test_bus_outage_delays_the_ack_and_loses_nothing() -> None:
    handled: list[str] = []
    service = harness(handled)
    await service.publish(StringValue(value="during-outage"))
    service.bus.fail_next_publishes(3)
    await service.run_until_idle()
    assert handled == ["during-outage"]
    assert len(service.emitted(Int64Value)) == 2
    assert service.bus.pending(service.group) == 0


async def test_store_outage_delays_the_ack_and_loses_nothing() -> None:
    handled: list[str] = []
    service = harness(handled)
    await service.publish(StringValue(value="x"))
    assert isinstance(service.state, MemoryStateStore)
    service.state.fail_next_commits(3)
    await service.run_until_idle()
    assert handled == ["x"]
    assert service.state.commits == 1


async def test_sigterm_drains_in_flight_work_and_acks_it() -> None:
    bus = MemoryBus()
    settings = fast_settings()
    started = asyncio.Event()
    finished: list[str] = []
    router = Router()

    @router.handles(StringValue)
    async def slow(event: StringValue, ctx: Context) -> None:
        started.set()
        await asyncio.sleep(0.05)
        finished.append(event.value)

    bus.bind(settings.consumer_group, router.event_types())
    await publish_to(bus, router, StringValue(value="x"))
    running = RunningLoop(make_loop(router, bus, MemoryStateStore(10, 60, time.time), settings))
    await asyncio.wait_for(started.wait(), 5)
    stats = await running.stop_gracefully()
    assert finished == ["x"]
    assert stats.acked == 1
    assert bus.pending(settings.consumer_group) == 0


async def test_drain_deadline_leaves_unfinished_work_for_redelivery() -> None:
    bus = MemoryBus()
    settings = fast_settings(drain_timeout_s=0.05)
    started = asyncio.Event()
    router = Router()

    @router.handles(StringValue)
    async def stuck(event: StringValue, ctx: Context) -> None:
        started.set()
        await asyncio.sleep(60)

    bus.bind(settings.consumer_group, router.event_types())
    await publish_to(bus, router, StringValue(value="x"))
    running = RunningLoop(make_loop(router, bus, MemoryStateStore(10, 60, time.time), settings))
    await asyncio.wait_for(started.wait(), 5)
    stats = await asyncio.wait_for(running.stop_gracefully(), 5)
    assert stats.acked == 0
    assert bus.pending(settings.consumer_group) == 1
    assert bus.queue(settings.consumer_group).ready[0].redelivered


async def test_a_redelivery_to_another_replica_is_recognised() -> None:
    """Competing replicas: A records E then dies before acking; E goes to B, which learns
    from the shared store that E was handled and drops it."""
    bus = MemoryBus()
    settings = fast_settings()
    store = MemoryStateStore(1000, 3600, time.time)  # stands for the shared store
    handled: list[str] = []
    router = echo_router(handled)
    group = settings.consumer_group
    bus.bind(group, router.event_types())

    replica_b = GatedBroker(bus, group)
    b = RunningLoop(make_loop(router, bus, store, settings, replica_b))
    await publish_to(bus, router, StringValue(value="warm-up"))
    await b.wait_until(lambda: handled == ["warm-up"])  # B has loaded the stream already
    replica_b.gate.clear()

    replica_a = GatedBroker(bus, group)
    replica_a.hang_acks = True
    a = RunningLoop(make_loop(router, bus, store, settings, replica_a))
    await publish_to(bus, router, StringValue(value="E"))
    await a.wait_until(lambda: store.commits == 2)  # E handled and recorded by A
    await a.crash()
    assert bus.queue(group).ready[0].redelivered

    replica_b.gate.set()
    await b.wait_until(lambda: bus.pending(group) == 0)
    stats = await b.stop_gracefully()
    assert handled == ["warm-up", "E"]  # not handled a second time
    assert stats.duplicates == 1
    assert stats.shared_lookups >= 1


class TakeOverGate(MemoryStateStore):
    """Takes a stream over only once `parties` take-overs are under way at once; taking
    over `failing` raises."""

    def __init__(self, parties: int, failing: str = "") -> None:
        super().__init__(1000, 3600, time.time)
        self.parties, self.failing = parties, failing
        self.arrived = self.cancelled = self.inside = self.most_at_once = 0
        self.all_arrived = asyncio.Event()

    async def take_over(self, stream: str) -> Fence:
        if stream == self.failing:
            raise ValueError(f"cannot take {stream} over")
        self.arrived += 1
        self.inside += 1
        self.most_at_once = max(self.most_at_once, self.inside)
        if self.arrived == self.parties:
            self.all_arrived.set()
        try:
            await self.all_arrived.wait()
            await asyncio.sleep(0)  # the later ones may come in meanwhile
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.inside -= 1
        return await super().take_over(stream)


def streams_of(store: MemoryStateStore) -> Streams:
    bus = MemoryBus()
    settings = fast_settings()
    broker = MemoryBroker(bus, settings.consumer_group, exclusive=True)
    return make_loop(Router(), bus, store, settings, broker).streams


async def test_streams_first_seen_together_are_restored_at_once() -> None:
    """A rebalance that assigns many partitions waits for one store round trip, not one
    per partition."""
    store = TakeOverGate(parties=3)
    streams = streams_of(store)
    async with asyncio.timeout(5):
        await streams.restore({"orders:0", "orders:1", "orders:2"})
    assert all(streams.get(f"orders:{n}") is not None for n in range(3))


async def test_a_failed_restore_raises_as_it_was_and_stops_the_others() -> None:
    store = TakeOverGate(parties=3, failing="orders:1")  # the other two wait for a third
    streams = streams_of(store)
    with pytest.raises(ValueError, match="orders:1"):
        async with asyncio.timeout(5):
            await streams.restore({"orders:0", "orders:1", "orders:2"})
    assert streams.get("orders:0") is None and streams.get("orders:2") is None
    assert (store.arrived, store.cancelled) == (2, 2)


async def test_a_rebalance_of_many_partitions_restores_a_bounded_number_at_once() -> None:
    store = TakeOverGate(parties=RESTORES_AT_ONCE)
    streams = streams_of(store)
    async with asyncio.timeout(5):
        await streams.restore({f"orders:{n}" for n in range(3 * RESTORES_AT_ONCE)})
    assert store.most_at_once == RESTORES_AT_ONCE
    assert all(streams.get(f"orders:{n}") is not None for n in range(3 * RESTORES_AT_ONCE))
