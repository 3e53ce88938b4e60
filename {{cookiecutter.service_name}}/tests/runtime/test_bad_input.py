"""Bad input never stops the loop (DESIGN §3.8), whenever a field is first read.

Template-owned; do not edit.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from google.protobuf.wrappers_pb2 import Int64Value, StringValue

from {{ cookiecutter.package_name }}.events import cloudevents_pb2
from {{ cookiecutter.package_name }}.runtime import Context, Router
from {{ cookiecutter.package_name }}.runtime.envelope import (
    CloudEventsProtobufCodec,
    TypeRegistry,
    event_type_of,
)
from {{ cookiecutter.package_name }}.runtime.errors import (
    InvalidEnvelope,
    UndecodableEvent,
)
from {{ cookiecutter.package_name }}.runtime.testing import ServiceHarness

from .conftest import FAST

STRING_TYPE = event_type_of(StringValue)
CODEC = CloudEventsProtobufCodec(TypeRegistry([StringValue]))
LAST_SECOND = 253_402_300_799  # 9999-12-31T23:59:59Z, the last second a datetime holds
FIRST_SECOND = -62_135_596_800  # 0001-01-01T00:00:00Z


def cloud_event(
    value: str = "x", *, source: str = "urn:test", **attributes: Callable[[object], None]
) -> cloudevents_pb2.CloudEvent:
    """A valid StringValue event; each keyword sets one attribute through a setter."""
    event = cloudevents_pb2.CloudEvent(
        id=f"id-{value}", source=source, spec_version="1.0", type=STRING_TYPE
    )
    event.proto_data.Pack(StringValue(value=value))
    attributes.setdefault("time", timestamp(1_800_000_000))
    for name, set_value in attributes.items():
        set_value(event.attributes[name])
    return event


def timestamp(seconds: int, nanos: int = 0) -> Callable[[object], None]:
    def set_value(attribute: object) -> None:
        stamp = attribute.ce_timestamp  # type: ignore[attr-defined]
        stamp.seconds, stamp.nanos = seconds, nanos

    return set_value


def text(value: str) -> Callable[[object], None]:
    def set_value(attribute: object) -> None:
        attribute.ce_string = value  # type: ignore[attr-defined]

    return set_value


UNREADABLE_TIMES = {
    "year 10000": timestamp(LAST_SECOND + 1),
    "year 0": timestamp(FIRST_SECOND - 1),
    "seconds beyond the platform": timestamp(2**62),
    "negative nanos": timestamp(0, -1),
    "nanos over a second": timestamp(0, 1_000_000_000),
}


def emitting_router(handled: list[str], *, read_time: bool = False) -> Router:
    """Handles StringValue and emits one Int64Value per event (reads `time` if asked)."""
    router = Router()

    @router.handles(StringValue)
    async def handle(event: StringValue, ctx: Context) -> None:
        if read_time:
            assert ctx.envelope.time is not None
        handled.append(event.value)
        ctx.emit(Int64Value(value=len(event.value)))

    return router


async def run_with_poison(
    poison: bytes, *, read_time: bool = False
) -> tuple[ServiceHarness, list[str]]:
    """Valid events before and after `poison`, through the real loop."""
    handled: list[str] = []
    service = ServiceHarness(emitting_router(handled, read_time=read_time), **FAST)
    topic = service.settings.topic_for(STRING_TYPE)
    service.publish_raw(cloud_event("before").SerializeToString(), topic)
    service.publish_raw(poison, topic)
    service.publish_raw(cloud_event("after").SerializeToString(), topic)
    await service.run_until_idle()
    return service, handled


@pytest.mark.parametrize("stamp", UNREADABLE_TIMES.values(), ids=UNREADABLE_TIMES.keys())
async def test_an_unreadable_correlation_id_is_dead_lettered_when_its_handler_emits(
    stamp: Callable[[object], None],
) -> None:
    """A timestamp extension first read to build an emitted event (the correlation id)
    crashed the whole process; on restart it came back first."""
    event = cloud_event("poison")
    stamp(event.attributes["correlationid"])
    poison = event.SerializeToString()

    service, handled = await run_with_poison(poison)

    assert handled == ["before", "poison", "after"]
    [parked] = service.dead_letters
    assert (parked.reason, parked.body) == ("invalid-envelope", poison)
    assert "correlationid" in parked.error
    assert len(service.emitted(Int64Value)) == 2  # nothing emitted for the dead-lettered one


@pytest.mark.parametrize("attribute", ["time", "expiresat"])
async def test_an_unreadable_attribute_nobody_reads_does_not_stop_an_emitting_event(
    attribute: str,
) -> None:
    """The loop reads only the correlation id of an event that emits; the events it emits
    carry it on as their correlation id (its own id when it has none)."""
    event = cloud_event("poison", correlationid=text("chain-1"))
    UNREADABLE_TIMES["year 10000"](event.attributes[attribute])

    service, handled = await run_with_poison(event.SerializeToString())

    assert handled == ["before", "poison", "after"]
    assert service.dead_letters == []
    correlations = [e.extensions["correlationid"] for e in service.emitted(Int64Value)]
    assert correlations == ["id-before", "chain-1", "id-after"]


@pytest.mark.parametrize("stamp", UNREADABLE_TIMES.values(), ids=UNREADABLE_TIMES.keys())
async def test_a_handler_reading_an_unreadable_time_dead_letters_its_event_once(
    stamp: Callable[[object], None],
) -> None:
    poison = cloud_event("poison", time=stamp).SerializeToString()

    service, handled = await run_with_poison(poison, read_time=True)

    assert handled == ["before", "after"]  # not retried, and never seen with time=None
    assert service.stats.retries == 0
    assert [parked.reason for parked in service.dead_letters] == ["invalid-envelope"]


def test_an_unreadable_time_fails_the_same_way_on_every_read() -> None:
    envelope = CODEC.decode(cloud_event(time=timestamp(LAST_SECOND + 1)).SerializeToString())
    for _ in range(2):
        with pytest.raises(InvalidEnvelope, match="time") as caught:
            _ = envelope.time
        assert caught.value.reason == "invalid-envelope"
        with pytest.raises(InvalidEnvelope):
            _ = envelope.extensions
    assert "invalid" in repr(envelope)  # repr never raises: logs and test failures use it


@pytest.mark.parametrize(("seconds", "year"), [(LAST_SECOND, 9999), (FIRST_SECOND, 1)])
def test_the_extreme_times_a_datetime_holds_are_read(seconds: int, year: int) -> None:
    event = cloud_event(time=timestamp(seconds, 999_999_999), expiresat=timestamp(seconds))
    envelope = CODEC.decode(event.SerializeToString())
    assert envelope.time is not None and envelope.time.year == year
    assert envelope.extensions["expiresat"].startswith(f"{year:04d}-")


def test_an_event_without_a_source_is_an_invalid_envelope() -> None:
    """CloudEvents requires `source`; both decode paths (the guessed type and the general
    one) refuse an event without it."""
    CODEC.decode(cloud_event().SerializeToString())  # primes the guess for StringValue
    for _ in range(2):
        with pytest.raises(UndecodableEvent) as caught:
            CODEC.decode(cloud_event(source="").SerializeToString())
        assert caught.value.reason == "invalid-envelope"
        assert "source" in caught.value.detail


async def test_an_event_without_a_source_is_dead_lettered() -> None:
    service, handled = await run_with_poison(cloud_event(source="").SerializeToString())
    assert handled == ["before", "after"]
    assert [parked.reason for parked in service.dead_letters] == ["invalid-envelope"]
