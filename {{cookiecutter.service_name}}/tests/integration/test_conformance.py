"""One conformance suite every broker adapter passes: memory, and the real broker this
service was generated for (see conftest.py for addresses). Template-owned; do not edit."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path

from google.protobuf.wrappers_pb2 import Int64Value, StringValue
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from {{ cookiecutter.package_name }}.runtime import Context, Router
from {{ cookiecutter.package_name }}.runtime.app import build_loop, event_registry
from {{ cookiecutter.package_name }}.runtime.brokers.base import (
    CONTENT_TYPE_HEADER,
    DLQ_ORIGINAL_SIZE,
    DLQ_REASON,
    DLQ_TRUNCATED,
    Broker,
    InboundMessage,
    OnRevoked,
    OutboundMessage,
)
from {{ cookiecutter.package_name }}.runtime.config import Settings
from {{ cookiecutter.package_name }}.runtime.envelope import (
    CONTENT_TYPE,
    CloudEventsProtobufCodec,
    Envelope,
    TypeRegistry,
    new_event_id,
)
from {{ cookiecutter.package_name }}.runtime.loop import ConsumerLoop
from {{ cookiecutter.package_name }}.runtime.state.memory import MemoryStateStore

from ..runtime.conftest import RecordingHeartbeat, RunningLoop, one_span
from .conftest import Backend, fetch_at_least, fetch_for, run_cli, wait_until

CODEC = CloudEventsProtobufCodec(TypeRegistry([StringValue, Int64Value]))
STRING_TYPE = "google.protobuf.StringValue"
INT_TYPE = "google.protobuf.Int64Value"


def event(value: str, key: str = "", event_id: str | None = None) -> bytes:
    return CODEC.encode(
        Envelope(
            id=event_id or new_event_id(),
            type=STRING_TYPE,
            source="urn:test",
            payload=StringValue(value=value),
            subject=key,
        )
    )


async def publish(
    backend: Backend, settings: Settings, messages: Sequence[OutboundMessage]
) -> None:
    producer = backend.broker(settings)
    await producer.start([])
    await producer.publish(messages)


def loop_for(
    backend: Backend, settings: Settings, router: Router, state: MemoryStateStore
) -> ConsumerLoop:
    return build_loop(settings, router, broker=backend.broker(settings), state=state)


def new_state() -> MemoryStateStore:
    return MemoryStateStore(100_000, 3600, time.time)


def relay_router() -> Router:
    """Emits an Int64Value (the value's length) for each StringValue."""
    router = Router()

    @router.handles(StringValue)
    async def handle(payload: StringValue, ctx: Context) -> None:
        ctx.emit(Int64Value(value=len(payload.value)))

    return router


async def relay_one_event(backend: Backend, settings: Settings) -> ConsumerLoop:
    """Runs a relay loop until one published StringValue is acked, then stops it."""
    loop = build_loop(settings, relay_router(), broker=backend.broker(settings), state=new_state())
    running = RunningLoop(loop)
    await running.wait_started()
    await publish(backend, settings, [OutboundMessage(settings.topic_for(STRING_TYPE), event("x"))])
    await running.wait_until(lambda: loop.stats.acked >= 1, deadline_s=60)
    await running.stop_gracefully()
    return loop


async def test_round_trip_keeps_body_key_and_headers(backend: Backend) -> None:
    settings = backend.settings()
    topic = settings.topic_for("round.trip")
    consumer = backend.broker(settings)
    await consumer.start([topic])
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    headers = {"h": "v", "traceparent": traceparent}
    await publish(backend, settings, [OutboundMessage(topic, b"body", "k-1", headers)])

    [message] = await fetch_at_least(consumer, 1)
    assert (message.body, message.key, message.topic) == (b"body", "k-1", topic)
    assert message.headers["h"] == "v"
    assert message.headers["traceparent"] == traceparent  # trace context crosses the bus
    await consumer.ack([message])


async def test_unacked_messages_return_to_the_next_consumer(backend: Backend) -> None:
    settings = backend.settings()
    topic = settings.topic_for("unacked")
    first = backend.broker(settings)
    await first.start([topic])
    await publish(backend, settings, [OutboundMessage(topic, b"m%d" % i) for i in range(3)])
    received = await fetch_at_least(first, 3)
    await first.close()  # died before its reaction was durable: no ack

    second = backend.broker(settings)
    await second.start([topic])
    again = await fetch_at_least(second, 3)
    assert sorted(m.body for m in again) == sorted(m.body for m in received)
    await second.ack(again)


async def test_acked_messages_do_not_come_back(backend: Backend) -> None:
    settings = backend.settings()
    topic = settings.topic_for("acked")
    first = backend.broker(settings)
    await first.start([topic])
    await publish(backend, settings, [OutboundMessage(topic, b"m%d" % i) for i in range(3)])
    await first.ack(await fetch_at_least(first, 3))
    await first.close()

    second = backend.broker(settings)
    await second.start([topic])
    assert await fetch_for(second, 2.0) == []


async def test_a_batch_gathers_what_arrives_within_the_fill_window(backend: Backend) -> None:
    """The loop's batch: deliveries trickling in within the fill window make one batch,
    and a batch that is full returns without waiting the window out."""
    settings = backend.settings()
    topic = settings.topic_for("fill")
    consumer, producer = backend.broker(settings), backend.broker(settings)
    await consumer.start([topic])
    await producer.start([])
    await producer.publish([OutboundMessage(topic, b"warm-up")])
    await consumer.ack(await fetch_at_least(consumer, 1))  # Kafka: the group is joined

    clock = asyncio.get_running_loop().time
    filling = asyncio.ensure_future(consumer.fetch_batch(10, 30.0, clock() + 3.0))
    for n in range(3):
        await producer.publish([OutboundMessage(topic, b"t%d" % n)])
        await asyncio.sleep(0.05)
    trickled = await filling
    assert sorted(m.body for m in trickled) == [b"t0", b"t1", b"t2"]
    await consumer.ack(trickled)

    await producer.publish([OutboundMessage(topic, b"f%d" % n) for n in range(3)])
    async with asyncio.timeout(20):  # far below the fill window: a full batch returns
        full = await consumer.fetch_batch(3, 30.0, clock() + 600.0)
    assert sorted(m.body for m in full) == [b"f0", b"f1", b"f2"]
    await consumer.ack(full)


async def test_bad_input_is_dead_lettered_with_a_reason(backend: Backend) -> None:
    settings = backend.settings()
    handled: list[str] = []
    router = Router()

    @router.handles(StringValue)
    async def handle(payload: StringValue, ctx: Context) -> None:
        handled.append(payload.value)

    running = RunningLoop(loop_for(backend, settings, router, new_state()))
    await running.wait_started()
    topic = settings.topic_for(STRING_TYPE)
    await publish(
        backend,
        settings,
        [OutboundMessage(topic, b"\x00\xffpoison"), OutboundMessage(topic, event("ok"))],
    )
    await running.wait_until(lambda: running.loop.stats.acked >= 2, deadline_s=30)
    await running.stop_gracefully()

    assert handled == ["ok"]
    [(body, headers)] = await backend.dead_letters(settings, topic, 1)
    assert body == b"\x00\xffpoison"
    assert headers[DLQ_REASON] == "undecodable"


class JournalingBroker(Broker):
    """Wraps a real adapter and records the order of publishes and acks."""

    def __init__(self, inner: Broker, journal: list[str]) -> None:
        self.inner = inner
        self.journal = journal
        self.messaging_system = inner.messaging_system

    async def start(self, topics: Sequence[str], on_revoked: OnRevoked | None = None) -> None:
        await self.inner.start(topics, on_revoked)

    async def fetch_batch(
        self, max_messages: int, first_wait_s: float, fill_until: float
    ) -> list[InboundMessage]:
        return await self.inner.fetch_batch(max_messages, first_wait_s, fill_until)

    def dead_letter_destination(self, topic: str) -> str:
        return self.inner.dead_letter_destination(topic)

    async def publish(self, messages: Sequence[OutboundMessage]) -> Sequence[OutboundMessage]:
        unrouted = await self.inner.publish(messages)
        self.journal.append("confirmed")
        return unrouted

    async def ack(self, messages: Sequence[InboundMessage]) -> None:
        self.journal.append("ack")
        await self.inner.ack(messages)

    async def close(self) -> None:
        await self.inner.close()


async def test_emitted_events_are_confirmed_before_the_source_is_acked(backend: Backend) -> None:
    settings = backend.settings()
    observer = backend.broker(
        settings.model_copy(update={"consumer_group": settings.consumer_group + "-observer"})
    )
    await observer.start([settings.topic_for(INT_TYPE)])
    journal: list[str] = []
    loop = build_loop(
        settings,
        relay_router(),
        broker=JournalingBroker(backend.broker(settings), journal),
        state=new_state(),
    )
    running = RunningLoop(loop)
    await running.wait_started()
    await publish(
        backend, settings, [OutboundMessage(settings.topic_for(STRING_TYPE), event("abc"))]
    )
    await running.wait_until(lambda: loop.stats.acked >= 1, deadline_s=30)
    await running.stop_gracefully()

    assert journal == ["confirmed", "ack"]
    [emitted] = await fetch_at_least(observer, 1)
    assert CODEC.decode(emitted.body).payload == Int64Value(value=3)
    assert emitted.headers[CONTENT_TYPE_HEADER] == CONTENT_TYPE


async def test_events_of_one_key_are_handled_in_order(backend: Backend) -> None:
    settings = backend.settings(batch_size=25)
    seen: dict[str, list[int]] = {}
    router = Router()

    @router.handles(StringValue)
    async def handle(payload: StringValue, ctx: Context) -> None:
        key, number = payload.value.split(":")
        seen.setdefault(key, []).append(int(number))

    running = RunningLoop(loop_for(backend, settings, router, new_state()))
    await running.wait_started()
    topic = settings.topic_for(STRING_TYPE)
    keys = [f"key-{k}" for k in range(6)]
    await publish(
        backend,
        settings,
        [OutboundMessage(topic, event(f"{k}:{n}", key=k), key=k) for n in range(40) for k in keys],
    )
    await running.wait_until(lambda: running.loop.stats.acked >= 240, deadline_s=60)
    await running.stop_gracefully()
    assert seen == {k: list(range(40)) for k in keys}


async def test_graceful_stop_drains_and_acks_in_flight_work(backend: Backend) -> None:
    settings = backend.settings()
    started = asyncio.Event()
    handled: list[str] = []
    router = Router()

    @router.handles(StringValue)
    async def slow(payload: StringValue, ctx: Context) -> None:
        started.set()
        await asyncio.sleep(0.2)
        handled.append(payload.value)

    running = RunningLoop(loop_for(backend, settings, router, new_state()))
    await running.wait_started()
    topic = settings.topic_for(STRING_TYPE)
    await publish(
        backend, settings, [OutboundMessage(topic, event(f"e{i}"), key=f"k{i}") for i in range(5)]
    )
    await asyncio.wait_for(started.wait(), 30)
    stats = await running.stop_gracefully()

    assert stats.acked == stats.received > 0
    assert len(handled) == stats.handled == stats.received
    successor = backend.broker(settings)
    await successor.start([topic])
    rest = await fetch_for(successor, 2.0)
    assert len(rest) == 5 - stats.received  # only what was never fetched
    await successor.ack(rest)


async def test_consumer_lag_counts_what_waits_and_falls_to_zero(backend: Backend) -> None:
    settings = backend.settings(batch_size=5)
    release = asyncio.Event()
    router = Router()

    @router.handles(StringValue)
    async def blocked(payload: StringValue, ctx: Context) -> None:
        await release.wait()

    running = RunningLoop(loop_for(backend, settings, router, new_state()))
    await running.wait_started()
    topic = settings.topic_for(STRING_TYPE)
    await publish(
        backend, settings, [OutboundMessage(topic, event(f"e{i}"), key=f"k{i}") for i in range(40)]
    )
    broker = running.loop.broker
    lags: list[int] = []

    async def waiting() -> int:
        lags.append(sum((await broker.lag()).values()))
        return lags[-1]

    async with asyncio.timeout(30):
        # All but a batch in flight and a prefetch; polls the bus, there is no event to await.
        while await waiting() < 40 - 2 * 5 * 2:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    release.set()
    await running.wait_until(lambda: running.loop.stats.acked >= 40, deadline_s=60)
    async with asyncio.timeout(30):
        while await waiting() > 0:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    await running.stop_gracefully()
    assert max(lags) <= 40


async def test_two_replicas_share_the_work_and_handle_each_event_once(backend: Backend) -> None:
    """A second replica joins mid-stream (a Kafka rebalance; RabbitMQ competing consumers)."""
    settings = backend.settings(batch_size=20)
    state = new_state()  # stands for the durable store both replicas share
    handled: list[str] = []
    router = Router()

    @router.handles(StringValue)
    async def handle(payload: StringValue, ctx: Context) -> None:
        await asyncio.sleep(0.001)
        handled.append(payload.value)

    topic = settings.topic_for(STRING_TYPE)
    first = RunningLoop(loop_for(backend, settings, router, state))
    await first.wait_started()
    await publish(
        backend,
        settings,
        [
            OutboundMessage(
                topic,
                event(f"a{i}"),
                key=f"k{i % 7}",
            )
            for i in range(150)
        ],
    )
    await wait_until(lambda: len(handled) >= 20)
    second = RunningLoop(loop_for(backend, settings, router, state))
    await second.wait_started()
    await publish(
        backend,
        settings,
        [OutboundMessage(topic, event(f"b{i}"), key=f"k{i % 7}") for i in range(150)],
    )
    await wait_until(lambda: len(set(handled)) >= 300, deadline_s=90)
    await first.stop_gracefully()
    await second.stop_gracefully()

    assert len(handled) == len(set(handled)) == 300


async def test_a_trace_crosses_the_bus_from_one_service_to_the_next(
    backend: Backend, spans: InMemorySpanExporter
) -> None:
    service_a, service_b = Router(), Router()

    @service_a.handles(StringValue)
    async def react(payload: StringValue, ctx: Context) -> None:
        ctx.emit(Int64Value(value=1))

    @service_b.handles(Int64Value)
    async def finish(payload: Int64Value, ctx: Context) -> None:
        return None

    base = backend.settings()
    a_settings = base.model_copy(update={"consumer_group": base.consumer_group + "-a"})
    b_settings = base.model_copy(update={"consumer_group": base.consumer_group + "-b"})
    a = RunningLoop(loop_for(backend, a_settings, service_a, new_state()))
    b = RunningLoop(loop_for(backend, b_settings, service_b, new_state()))
    await a.wait_started()
    await b.wait_started()
    await publish(backend, base, [OutboundMessage(base.topic_for(STRING_TYPE), event("x"))])
    await b.wait_until(lambda: b.loop.stats.handled >= 1, deadline_s=60)
    await a.stop_gracefully()
    await b.stop_gracefully()

    finished = list(spans.get_finished_spans())
    consume_a = one_span(finished, f"process {base.topic_for(STRING_TYPE)}")
    produce_a = one_span(finished, f"send {base.topic_for(INT_TYPE)}")
    consume_b = one_span(finished, f"process {base.topic_for(INT_TYPE)}")
    assert consume_b.context.trace_id == produce_a.context.trace_id == consume_a.context.trace_id
    assert consume_b.parent is not None and consume_b.parent.span_id == produce_a.context.span_id
    assert consume_b.attributes is not None
    assert consume_b.attributes["messaging.system"] == backend.name


async def test_emit_from_the_command_line_sends_the_cloudevents_content_type(
    real_backend: Backend,
) -> None:
    """`emit` builds its message as the loop does (one conversion): the structured-mode
    content type arrives (Kafka: a header; RabbitMQ: the content-type property)."""
    settings = real_backend.settings()
    event_type = event_registry().names()[0]
    consumer = real_backend.broker(settings)
    await consumer.start([settings.topic_for(event_type)])
    emitted = run_cli(settings, "emit", event_type, "{}", "--key", "k-1", "--id", "e-1")
    assert emitted.returncode == 0, emitted.stderr
    [message] = await fetch_at_least(consumer, 1)
    assert message.headers[CONTENT_TYPE_HEADER] == CONTENT_TYPE
    assert message.key == "k-1"
    await consumer.ack([message])
    assert json.loads(emitted.stdout)["routed"] is True


def heartbeat_loop(
    backend: Backend, settings: Settings, router: Router, tmp_path: Path
) -> tuple[ConsumerLoop, RecordingHeartbeat]:
    heartbeat = RecordingHeartbeat(tmp_path / "heartbeat")
    loop = build_loop(
        settings, router, broker=backend.broker(settings), state=new_state(), heartbeat=heartbeat
    )
    return loop, heartbeat


async def test_an_oversized_input_is_parked_and_the_loop_moves_on(
    backend: Backend, tmp_path: Path
) -> None:
    """A 1.2 MB event (MAX_MESSAGE_BYTES is 1 MiB) is parked as `oversized`: whole where
    the bus takes it back (RabbitMQ, memory), else cut to fit with its original size
    (Kafka); the loop goes on and never reports the bus as down meanwhile."""
    settings = backend.settings()
    handled: list[str] = []
    router = Router()

    @router.handles(StringValue)
    async def handle(payload: StringValue, ctx: Context) -> None:
        handled.append(payload.value)

    loop, heartbeat = heartbeat_loop(backend, settings, router, tmp_path)
    running = RunningLoop(loop)
    await running.wait_started()
    topic = settings.topic_for(STRING_TYPE)
    big = event("x" * 1_200_000)
    producer = backend.settings(max_message_bytes=4 * 1024 * 1024)  # another service's limit
    await publish(backend, producer, [OutboundMessage(topic, big)])
    await publish(backend, settings, [OutboundMessage(topic, event("after"))])
    await running.wait_until(lambda: loop.stats.acked >= 2, deadline_s=60)
    await running.stop_gracefully()

    assert handled == ["after"]
    [(body, headers)] = await backend.dead_letters(settings, topic, 1)
    assert headers[DLQ_REASON] == "oversized"
    assert big.startswith(body)
    if backend.name == "kafka":  # its producer takes MAX_MESSAGE_BYTES and a little more
        assert len(body) == settings.max_message_bytes
    if len(body) < len(big):
        assert headers[DLQ_ORIGINAL_SIZE] == str(len(big))
        assert headers[DLQ_TRUNCATED] == "body"
    assert False not in heartbeat.readiness


async def test_an_event_the_bus_can_never_take_dead_letters_its_source(
    backend: Backend, tmp_path: Path
) -> None:
    """An emitted event too large for the bus, or with a key too long for it (RabbitMQ
    carries the key in a header: 200 kB of it is a frame the broker refuses by closing
    the connection), parks the event it was emitted for; the loop goes on."""
    settings = backend.settings()
    router = Router()

    @router.handles(StringValue)
    async def handle(payload: StringValue, ctx: Context) -> None:
        if payload.value == "big":
            ctx.emit(StringValue(value="y" * (settings.max_message_bytes + 1)))
            ctx.emit(Int64Value(value=0))  # dropped with its sibling: all or nothing
        elif payload.value == "long-key":
            ctx.emit(Int64Value(value=1), key="k" * 200_000)
        else:
            ctx.emit(Int64Value(value=2), key="fine")

    observer_settings = settings.model_copy(
        update={"consumer_group": settings.consumer_group + "-observer"}
    )
    observer = backend.broker(observer_settings)
    await observer.start([settings.topic_for(INT_TYPE)])
    loop, heartbeat = heartbeat_loop(backend, settings, router, tmp_path)
    running = RunningLoop(loop)
    await running.wait_started()
    topic = settings.topic_for(STRING_TYPE)
    await publish(
        backend,
        settings,
        [OutboundMessage(topic, event(value)) for value in ("big", "long-key", "fine")],
    )
    await running.wait_until(lambda: loop.stats.acked >= 3, deadline_s=60)
    stats = await running.stop_gracefully()

    parked = await backend.dead_letters(settings, topic, 2)
    sources = [CODEC.decode(body).payload for body, _ in parked]
    assert sorted(source.value for source in sources if isinstance(source, StringValue)) == [
        "big",
        "long-key",
    ]
    assert {headers[DLQ_REASON] for _, headers in parked} == {"emit-unpublishable"}
    assert (stats.handled, stats.emitted, stats.dead_lettered["emit-unpublishable"]) == (1, 1, 2)
    [emitted] = await fetch_at_least(observer, 1)
    assert CODEC.decode(emitted.body).payload == Int64Value(value=2)
    assert await fetch_for(observer, 1.0) == []
    await observer.ack([emitted])
    assert False not in heartbeat.readiness
