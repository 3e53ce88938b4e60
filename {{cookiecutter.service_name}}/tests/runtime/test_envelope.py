"""The CloudEvents protobuf envelope. Template-owned; do not edit."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from google.protobuf.wrappers_pb2 import Int64Value, StringValue

from {{ cookiecutter.package_name }}.events import cloudevents_pb2
from {{ cookiecutter.package_name }}.runtime.envelope import (
    CloudEventsProtobufCodec,
    Envelope,
    TypeRegistry,
    derive_event_id,
)
from {{ cookiecutter.package_name }}.runtime.errors import UndecodableEvent

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
    assert CODEC.decode(CODEC.encode(sent)) == sent


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
                id="x", type="google.protobuf.StringValue", spec_version="1.0", text_data="hi"
            ).SerializeToString(),
            "schema-mismatch",
        ),
    ],
)
def test_bad_bytes_raise_undecodable_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(UndecodableEvent) as caught:
        CODEC.decode(data)
    assert caught.value.reason == reason


def test_derived_ids_are_stable_and_distinct() -> None:
    assert derive_event_id("a", 0) == derive_event_id("a", 0)
    assert len({derive_event_id("a", 0), derive_event_id("a", 1), derive_event_id("b", 0)}) == 3
