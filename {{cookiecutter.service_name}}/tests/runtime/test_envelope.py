"""The CloudEvents protobuf envelope. Template-owned; do not edit."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message
from google.protobuf.wrappers_pb2 import Int64Value, StringValue

from {{ cookiecutter.package_name }}.events import cloudevents_pb2
from {{ cookiecutter.package_name }}.runtime import Context, Router
from {{ cookiecutter.package_name }}.runtime.envelope import (
    EMIT_ID_NAMESPACE,
    CloudEventsProtobufCodec,
    Envelope,
    TypeRegistry,
    dataschema_of,
    derive_event_id,
)
from {{ cookiecutter.package_name }}.runtime.errors import UndecodableEvent
from {{ cookiecutter.package_name }}.runtime.testing import ServiceHarness

CODEC = CloudEventsProtobufCodec(TypeRegistry([StringValue]))


def test_round_trip_keeps_every_attribute() -> None:
    sent = Envelope(
        id="e-1",
        type="google.protobuf.StringValue",
        source="urn:service:test",
        payload=StringValue(value="hello"),
        subject="order-7",
        time=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        extensions={"causationid": "e-0"},
    )
    for _ in range(2):  # the second time on the guessed type
        assert CODEC.decode(CODEC.encode(sent)) == sent


def test_one_extension_reads_as_the_extensions_do() -> None:
    sent = Envelope(
        "e-1",
        "google.protobuf.StringValue",
        "urn:x",
        StringValue(),
        subject="order-7",
        extensions={"correlationid": "c-1"},
    )
    for envelope in (sent, CODEC.decode(CODEC.encode(sent))):
        assert envelope.extension("correlationid") == "c-1"
        assert envelope.extension("causationid") is None
        assert envelope.extension("subject") is None  # an attribute, not an extension


def test_wire_format_is_the_cloudevents_protobuf_message() -> None:
    data = CODEC.encode(Envelope("e-1", "google.protobuf.StringValue", "urn:x", StringValue()))
    event = cloudevents_pb2.CloudEvent.FromString(data)
    assert (event.id, event.spec_version, event.source) == ("e-1", "1.0", "urn:x")
    assert event.attributes["datacontenttype"].ce_string == "application/protobuf"
    assert event.proto_data.type_url == "type.googleapis.com/google.protobuf.StringValue"


def test_other_producers_events_decode_under_any_type_url_prefix_and_without_subject() -> None:
    event = cloudevents_pb2.CloudEvent(
        id="e-3", source="urn:other", spec_version="1.0", type="google.protobuf.StringValue"
    )
    event.proto_data.Pack(StringValue(value="hi"), type_url_prefix="example.com/types/")
    decoded = CODEC.decode(event.SerializeToString())
    assert (decoded.payload, decoded.subject) == (StringValue(value="hi"), "")
    assert (decoded.time, decoded.extensions) == (None, {})


def test_unknown_type_decodes_without_payload() -> None:
    data = CloudEventsProtobufCodec(TypeRegistry([Int64Value])).encode(
        Envelope("e-2", "google.protobuf.Int64Value", "urn:x", Int64Value(value=3))
    )
    assert CODEC.decode(data).payload is None


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xff\xff", "undecodable"),
        (b"", "invalid-envelope"),
        (cloudevents_pb2.CloudEvent(id="x", type="t").SerializeToString(), "invalid-envelope"),
        (
            cloudevents_pb2.CloudEvent(
                id="x",
                source="urn:x",
                type="google.protobuf.StringValue",
                spec_version="1.0",
                text_data="hi",
            ).SerializeToString(),
            "schema-mismatch",
        ),
    ],
)
def test_bad_bytes_raise_undecodable_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(UndecodableEvent) as caught:
        CODEC.decode(data)
    assert caught.value.reason == reason


def _event(event_id: str, payload: Message, subject: str = "") -> Envelope:
    return Envelope(event_id, payload.DESCRIPTOR.full_name, "urn:x", payload, subject)


def test_events_decode_alike_whatever_type_came_before() -> None:
    """Decoding guesses the type of the event before: every guess, right or wrong, and
    every kind of bad event behind it, gives what the general path gives."""
    codec = CloudEventsProtobufCodec(TypeRegistry([StringValue, Int64Value]))
    sent = [
        _event("s-1", StringValue(value="a"), "k1"),
        _event("s-2", StringValue(value="b")),
        _event("i-1", Int64Value(value=7), "k2"),
        _event("s-3", StringValue(value="c"), "k3"),
        _event("i-2", Int64Value()),  # an empty payload: no value bytes on the wire
    ]
    for first in sent:
        for second in sent:
            codec.decode(codec.encode(first))  # sets the guess
            decoded = codec.decode(codec.encode(second))
            assert decoded == second
            assert type(decoded.payload) is type(second.payload)
    codec.decode(codec.encode(sent[0]))
    foreign = cloudevents_pb2.CloudEvent(
        id="f-1", source="urn:other", spec_version="1.0", type=sent[0].type
    )
    foreign.proto_data.Pack(StringValue(value="hi"), type_url_prefix="example.com/types/")
    assert codec.decode(foreign.SerializeToString()).payload == StringValue(value="hi")


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (  # the payload's bytes are not a StringValue (invalid UTF-8)
            cloudevents_pb2.CloudEvent(
                id="x",
                source="urn:x",
                type="google.protobuf.StringValue",
                spec_version="1.0",
                proto_data={
                    "type_url": "type.googleapis.com/google.protobuf.StringValue",
                    "value": b"\n\x02\xff\xfe",
                },
            ),
            "schema-mismatch",
        ),
        (  # packed as another type
            cloudevents_pb2.CloudEvent(
                id="x",
                source="urn:x",
                type="google.protobuf.StringValue",
                spec_version="1.0",
                proto_data={"type_url": "type.googleapis.com/google.protobuf.Int64Value"},
            ),
            "schema-mismatch",
        ),
        (
            cloudevents_pb2.CloudEvent(
                id="x",
                source="urn:x",
                type="google.protobuf.StringValue",
                spec_version="1.0",
                text_data="hi",
            ),
            "schema-mismatch",
        ),
        (
            cloudevents_pb2.CloudEvent(
                id="", type="google.protobuf.StringValue", spec_version="1.0"
            ),
            "invalid-envelope",
        ),
    ],
)
def test_bad_events_after_a_good_one_of_their_type_get_the_same_reason(
    event: cloudevents_pb2.CloudEvent, reason: str
) -> None:
    codec = CloudEventsProtobufCodec(TypeRegistry([StringValue]))
    codec.decode(codec.encode(_event("s-1", StringValue(value="a"))))
    with pytest.raises(UndecodableEvent) as caught:
        codec.decode(event.SerializeToString())
    assert caught.value.reason == reason


def test_payload_types_from_another_descriptor_pool_decode() -> None:
    pool = descriptor_pool.DescriptorPool()
    file = descriptor_pb2.FileDescriptorProto(name="other/thing.proto", package="other")
    file.message_type.add(name="Thing").field.add(
        name="n",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    pool.Add(file)
    thing = message_factory.GetMessageClass(pool.FindMessageTypeByName("other.Thing"))
    codec = CloudEventsProtobufCodec(TypeRegistry([thing]))
    sent = _event("t-1", thing(n=5), "k")
    for _ in range(2):
        assert codec.decode(codec.encode(sent)) == sent


def test_derived_ids_are_stable_and_distinct() -> None:
    assert derive_event_id("a", 0) == derive_event_id("a", 0)
    assert len({derive_event_id("a", 0), derive_event_id("a", 1), derive_event_id("b", 0)}) == 3


FIELD = descriptor_pb2.FieldDescriptorProto


def thing_class(
    n_type: int = FIELD.TYPE_INT64, money_type: int = FIELD.TYPE_INT64
) -> type[Message]:
    """other.Thing {n; Money price} in a pool of its own, field types as given."""
    pool = descriptor_pool.DescriptorPool()
    file = descriptor_pb2.FileDescriptorProto(name="other/thing.proto", package="other")
    money = file.message_type.add(name="Money")
    money.field.add(name="cents", number=1, type=money_type, label=FIELD.LABEL_OPTIONAL)
    thing = file.message_type.add(name="Thing")
    thing.field.add(name="n", number=1, type=n_type, label=FIELD.LABEL_OPTIONAL)
    thing.field.add(
        name="price",
        number=2,
        type=FIELD.TYPE_MESSAGE,
        type_name=".other.Money",
        label=FIELD.LABEL_OPTIONAL,
    )
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("other.Thing"))


def test_events_name_their_type_and_schema_version_in_dataschema() -> None:
    data = CODEC.encode(Envelope("e-1", "google.protobuf.StringValue", "urn:x", StringValue()))
    schema = cloudevents_pb2.CloudEvent.FromString(data).attributes["dataschema"].ce_uri
    assert re.fullmatch(r"urn:protobuf:google\.protobuf\.StringValue:[0-9a-f]{12}", schema)
    assert CODEC.decode(data).dataschema == schema


def test_the_schema_version_follows_the_schema_not_the_service() -> None:
    version = dataschema_of(thing_class())
    assert dataschema_of(thing_class()) == version  # the same .proto in another service
    assert dataschema_of(thing_class(n_type=FIELD.TYPE_INT32)) != version
    assert dataschema_of(thing_class(money_type=FIELD.TYPE_INT32)) != version  # a nested type


async def test_emitted_events_carry_their_dataschema() -> None:
    router = Router()

    @router.handles(StringValue)
    async def echo(event: StringValue, ctx: Context) -> None:
        ctx.emit(Int64Value(value=len(event.value)), key="k")

    service = ServiceHarness(router)
    await service.publish(StringValue(value="abc"), key="k")
    await service.run_until_idle()
    [emitted] = service.emitted(Int64Value)
    assert emitted.dataschema == dataschema_of(Int64Value)
    assert emitted.dataschema.startswith("urn:protobuf:google.protobuf.Int64Value:")


@pytest.mark.parametrize("parent", ["a", "e-1", "ünïcode", "3f2b8a0c-55d1-4c6e-9f1a-0b7c2d9e4a11"])
def test_derived_ids_are_the_uuid5_of_parent_and_position(parent: str) -> None:
    # Services already running derive ids this way: a faster path must not change one.
    for position in range(40):
        expected = str(uuid.uuid5(EMIT_ID_NAMESPACE, f"{parent}#{position}"))
        assert derive_event_id(parent, position) == expected


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=-7))),
        datetime(2026, 1, 2, 3, 4, 5, 678901),  # naive: UTC
        datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC),  # before the epoch
        datetime(1, 1, 1, tzinfo=UTC),
    ],
)
def test_encoding_is_what_protobuf_packs(moment: datetime) -> None:
    """The encoder sets the Any and the timestamp itself (Pack and FromDatetime cost more
    than the rest of an event): the bytes stay those protobuf's own helpers make."""
    sent = Envelope(
        "e-1", "google.protobuf.StringValue", "urn:x", StringValue(value="v"), "k", moment
    )
    expected = cloudevents_pb2.CloudEvent(
        id="e-1", source="urn:x", spec_version="1.0", type="google.protobuf.StringValue"
    )
    expected.attributes["datacontenttype"].ce_string = "application/protobuf"
    expected.attributes["dataschema"].ce_uri = dataschema_of(StringValue)
    expected.attributes["subject"].ce_string = "k"
    expected.attributes["time"].ce_timestamp.FromDatetime(moment)
    expected.proto_data.Pack(StringValue(value="v"))
    assert cloudevents_pb2.CloudEvent.FromString(CODEC.encode(sent)) == expected
