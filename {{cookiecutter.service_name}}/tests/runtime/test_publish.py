"""Publishing on the in-memory bus: what every publisher puts on the wire, what a bus can
never take, and events no consumer is bound for. Template-owned; do not edit."""

from __future__ import annotations

import time
from pathlib import Path

from google.protobuf.wrappers_pb2 import Int64Value, StringValue

from {{ cookiecutter.package_name }}.runtime import Context, Router
from {{ cookiecutter.package_name }}.runtime.brokers.base import (
    CONTENT_TYPE_HEADER,
    DLQ_ERROR,
    DLQ_ORIGINAL_SIZE,
    DLQ_REASON,
    DLQ_TRUNCATED,
    MAX_PARKED_HEADER,
    DeadLetterRecord,
    InboundMessage,
    OutboundMessage,
    PublishLimits,
    dead_letter_message,
    header_bytes,
)
from {{ cookiecutter.package_name }}.runtime.brokers.memory import MemoryBroker, MemoryBus
from {{ cookiecutter.package_name }}.runtime.envelope import CONTENT_TYPE
from {{ cookiecutter.package_name }}.runtime.state.memory import MemoryStateStore

from .conftest import RecordingHeartbeat, RunningLoop, fast_settings, make_loop, publish_to

STRING_TOPIC = "google.protobuf.StringValue"


def parked(body: bytes, key: str = "", **headers: str) -> OutboundMessage:
    origin = InboundMessage(body, STRING_TOPIC, "s", 7, key, headers)
    record = DeadLetterRecord(origin, "oversized", "too big")
    return dead_letter_message(record, STRING_TOPIC + ".dlq", "svc")


def test_a_dead_letter_is_cut_to_fit_and_says_what_was_cut() -> None:
    limits = PublishLimits(body=100, key=10, headers=2000)
    copied = {f"h{n}": "v" * 3000 for n in range(3)}  # each cut, then no room for the rest
    letter = parked(b"x" * 250, key="é" * 8, **copied)
    assert limits.refusal(letter) is not None

    cut = limits.fit(letter)
    assert limits.refusal(cut) is None
    assert cut.body == b"x" * 100
    assert cut.key == "é" * 5  # 10 bytes of UTF-8, cut on a character boundary
    assert cut.headers[DLQ_ORIGINAL_SIZE] == "250"
    assert cut.headers[DLQ_TRUNCATED] == "body,key,headers"
    assert (cut.headers[DLQ_REASON], cut.headers[DLQ_ERROR]) == ("oversized", "too big")
    assert cut.headers["h0"] == "v" * MAX_PARKED_HEADER
    assert "h2" not in cut.headers
    assert header_bytes(cut.headers) <= limits.headers
    # Cut again (a bus taking less than it said): the original size stays the first one.
    again = limits.fit(cut, body=40)
    assert (len(again.body), again.headers[DLQ_ORIGINAL_SIZE]) == (40, "250")


def test_dead_letters_may_be_parked_larger_than_events() -> None:
    limits = PublishLimits(body=100, parked_body=1000)
    assert limits.refusal(parked(b"x" * 500)) is None
    event = OutboundMessage(STRING_TOPIC, b"x" * 500)
    assert limits.refusal(event) == "body is 500 bytes; the bus takes 100"


async def test_a_dead_letter_the_bus_cannot_take_whole_is_parked_cut(tmp_path: Path) -> None:
    """A bus that takes no more than MAX_MESSAGE_BYTES (Kafka): the oversized input is
    parked cut to fit, the loop goes on, and readiness never blames the bus."""
    settings = fast_settings(max_message_bytes=1000)
    handled: list[str] = []
    router = Router()

    @router.handles(StringValue)
    async def handle(event: StringValue, ctx: Context) -> None:
        handled.append(event.value)

    bus = MemoryBus()
    broker = MemoryBroker(bus, settings.consumer_group, limits=PublishLimits(body=1000))
    loop = make_loop(router, bus, MemoryStateStore(100, 60, time.time), settings, broker)
    heartbeat = loop.heartbeat = RecordingHeartbeat(tmp_path / "heartbeat")
    bus.bind(settings.consumer_group, [STRING_TOPIC])
    bus.put(OutboundMessage(STRING_TOPIC, b"y" * 1500))
    await publish_to(bus, router, StringValue(value="after"))
    running = RunningLoop(loop)
    await running.wait_until(lambda: bus.pending(settings.consumer_group) == 0)
    stats = await running.stop_gracefully()

    [letter] = [message for message in bus.published if message.dead_letter]
    assert (letter.body, letter.headers[DLQ_REASON]) == (b"y" * 1000, "oversized")
    assert letter.headers[DLQ_ORIGINAL_SIZE] == "1500"
    assert handled == ["after"]
    assert stats.dead_lettered["oversized"] == 1
    assert False not in heartbeat.readiness


async def test_events_no_consumer_is_bound_for_are_counted() -> None:
    settings = fast_settings()
    router = Router()

    @router.handles(StringValue)
    async def handle(event: StringValue, ctx: Context) -> None:
        ctx.emit(Int64Value(value=1))  # nobody consumes these
        if event.value == "x":
            ctx.emit(StringValue(value="x-again"))  # this service does

    bus = MemoryBus()
    bus.bind(settings.consumer_group, [STRING_TOPIC])
    await publish_to(bus, router, StringValue(value="x"))
    running = RunningLoop(make_loop(router, bus, MemoryStateStore(100, 60, time.time), settings))
    await running.wait_until(lambda: running.loop.stats.acked >= 2)
    stats = await running.stop_gracefully()

    assert (stats.emitted, stats.unrouted) == (3, 2)  # the Int64Value events
    assert all(m.headers[CONTENT_TYPE_HEADER] == CONTENT_TYPE for m in bus.published[1:])
