"""Fuzzing the envelope codec and the whole loop (DESIGN §3.8). Template-owned; do not edit.

Hypothesis builds CloudEvents, valid ones and ones broken on purpose (missing attributes,
timestamps no datetime holds, garbage in the Any, huge strings), and mutates their bytes
(bit flips, truncation, appended fields of any wire type). An oracle written from the
CloudEvents spec, not from the codec, says what each message must come to; the codec and
the real loop on the memory bus must agree with it, and nothing else may escape either.

`FUZZ_EXAMPLES` sets how many examples each property tries (CI runs the default; raise it
to search longer locally). Hypothesis prints the seed and the smallest failing input.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.wrappers_pb2 import Int64Value, StringValue
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from {{ cookiecutter.package_name }}.events import cloudevents_pb2
from {{ cookiecutter.package_name }}.runtime import Context, Router
from {{ cookiecutter.package_name }}.runtime.envelope import (
    CloudEventsProtobufCodec,
    Envelope,
    TypeRegistry,
    event_type_of,
)
from {{ cookiecutter.package_name }}.runtime.errors import (
    InvalidEnvelope,
    UndecodableEvent,
)
from {{ cookiecutter.package_name }}.runtime.modes import BINARY_PREFIXES, ContentModes
from {{ cookiecutter.package_name }}.runtime.testing import ServiceHarness

from .conftest import FAST

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # the machine's speed is not under test
    database=None,  # no .hypothesis/ folder in the service's checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
KNOWN_TYPE = event_type_of(StringValue)
OTHER_TYPE = event_type_of(Int64Value)  # a valid type this service has no handler for
MAX_BYTES = 4096  # the loop's MAX_MESSAGE_BYTES here: huge strings make oversized messages
FIRST_SECOND, LAST_SECOND = -62_135_596_800, 253_402_300_799  # years 1 and 9999
NOT_EXTENSIONS = {"subject", "datacontenttype", "dataschema"}  # read as text or not at all
Attribute = cloudevents_pb2.CloudEvent.CloudEventAttributeValue

# --- what a message must come to, from the CloudEvents spec -------------------------------


@dataclass(frozen=True)
class Expected:
    """`dead` (a reason) if it is parked before dedupe (bytes, envelope or payload wrong);
    else its id, whether its type is handled here and whether its timestamps can be read
    (all of them; its correlation id, the one the loop reads of an event that emits), and
    whether reading_router's handler reads every attribute: its first delivery is handled
    if the attributes read hold, else parked with `parked_as`."""

    dead: str = ""
    event_id: str = ""
    known: bool = False
    times_hold: bool = True
    correlation_holds: bool = True
    reads_all: bool = True

    @property
    def handled(self) -> bool:
        return self.known and (self.times_hold if self.reads_all else self.correlation_holds)

    @property
    def parked_as(self) -> str:
        return self.dead or ("unknown-type" if not self.known else "invalid-envelope")


def expected(data: bytes, max_bytes: int | None = None) -> Expected:
    if max_bytes is not None and len(data) > max_bytes:
        return Expected(dead="oversized")
    try:
        event = cloudevents_pb2.CloudEvent.FromString(data)
    except DecodeError:
        return Expected(dead="undecodable")
    if not (event.id and event.source and event.type and event.spec_version == "1.0"):
        return Expected(dead="invalid-envelope")
    known = event.type == KNOWN_TYPE
    reads_all = True
    if known:
        packed = event.proto_data
        if event.WhichOneof("data") != "proto_data" or packed.type_url.split("/")[-1] != KNOWN_TYPE:
            return Expected(dead="schema-mismatch")
        try:
            reads_all = len(StringValue.FromString(packed.value).value) % 2 == 0
        except DecodeError:
            return Expected(dead="schema-mismatch")
    stamps = {
        name: _holds(value.ce_timestamp)
        for name, value in event.attributes.items()
        if name not in NOT_EXTENSIONS and value.WhichOneof("attr") == "ce_timestamp"
    }
    return Expected(
        event_id=event.id,
        known=known,
        times_hold=all(stamps.values()),
        correlation_holds=stamps.get("correlationid", True),
        reads_all=reads_all,
    )


def _holds(stamp: Timestamp) -> bool:
    return FIRST_SECOND <= stamp.seconds <= LAST_SECOND and 0 <= stamp.nanos <= 999_999_999


# --- messages: valid CloudEvents, some broken on purpose, some mutated as bytes -----------

texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=8)
# Repeated ids are duplicates; a few made-up ones may be empty (an invalid envelope).
ids = st.uuids().map(str) | st.sampled_from(["id-1", "id-2"]) | texts
readable_stamps = st.tuples(
    st.integers(FIRST_SECOND, LAST_SECOND) | st.sampled_from([FIRST_SECOND, LAST_SECOND]),
    st.integers(0, 999_999_999),
)
unreadable_stamps = st.one_of(
    st.tuples(
        st.integers(LAST_SECOND + 1, 2**63 - 1) | st.integers(-(2**63), FIRST_SECOND - 1),
        st.integers(0, 999_999_999),
    ),
    st.tuples(
        st.integers(FIRST_SECOND, LAST_SECOND),
        st.integers(1_000_000_000, 2**31 - 1) | st.integers(-(2**31), -1),
    ),
)
extension_names = (
    st.sampled_from(["expiresat", "causationid", "correlationid", "traceparent"]) | texts
)


def set_stamp(attribute: Attribute, stamp: tuple[int, int]) -> None:
    attribute.ce_timestamp.seconds, attribute.ce_timestamp.nanos = stamp


@st.composite
def extension_values(draw: st.DrawFn) -> Attribute:
    value = Attribute()
    kind = draw(st.sampled_from(["ce_boolean", "ce_integer", "ce_string", "ce_bytes", "ce_uri"]))
    if kind == "ce_boolean":
        value.ce_boolean = draw(st.booleans())
    elif kind == "ce_integer":
        value.ce_integer = draw(st.integers(-(2**31), 2**31 - 1))
    elif kind == "ce_bytes":
        value.ce_bytes = draw(st.binary(max_size=8))
    else:
        setattr(value, kind, draw(texts))
    return value


@st.composite
def valid_events(draw: st.DrawFn) -> cloudevents_pb2.CloudEvent:
    event = cloudevents_pb2.CloudEvent(
        id=draw(ids), source="urn:fuzz", spec_version="1.0", type=KNOWN_TYPE
    )
    if draw(st.booleans()):
        set_stamp(event.attributes["time"], draw(readable_stamps))
    if draw(st.booleans()):
        event.attributes["subject"].ce_string = draw(texts)
    extensions = draw(st.dictionaries(extension_names, extension_values(), max_size=3))
    for name, value in extensions.items():
        event.attributes[name].CopyFrom(value)
    event.proto_data.Pack(StringValue(value=draw(texts)))
    return event


# Each breaks one thing in a valid event, as a careless or foreign producer would.
BREAKAGES: dict[str, Callable[[cloudevents_pb2.CloudEvent, st.DrawFn], object]] = {
    "no id": lambda event, draw: event.ClearField("id"),
    "no source": lambda event, draw: event.ClearField("source"),
    "another specversion": lambda event, draw: setattr(
        event, "spec_version", draw(st.sampled_from(["0.3", ""]))
    ),
    "no type": lambda event, draw: event.ClearField("type"),
    "an unknown type": lambda event, draw: setattr(
        event, "type", draw(st.sampled_from([OTHER_TYPE, "x.Y"]))
    ),
    "an unreadable time": lambda event, draw: set_stamp(
        event.attributes["time"], draw(unreadable_stamps)
    ),
    "an unreadable timestamp extension": lambda event, draw: set_stamp(
        event.attributes[draw(extension_names)], draw(unreadable_stamps)
    ),
    "garbage in the Any": lambda event, draw: setattr(
        event.proto_data, "value", draw(st.binary(max_size=16))
    ),
    "another payload type": lambda event, draw: event.proto_data.Pack(
        Int64Value(value=7), "example.com/t/"
    ),
    "text data": lambda event, draw: setattr(event, "text_data", draw(texts)),
    "no data": lambda event, draw: event.ClearField("proto_data"),
    "a huge payload": lambda event, draw: event.proto_data.Pack(StringValue(value="x" * MAX_BYTES)),
    "a huge subject": lambda event, draw: setattr(
        event.attributes["subject"], "ce_string", "é" * MAX_BYTES
    ),
}


# What only a lazy read finds: more often, as few other breakages go with them unnoticed.
UNREADABLE = ["an unreadable time", "an unreadable timestamp extension"]


@st.composite
def byte_mutations(draw: st.DrawFn, data: bytes) -> bytes:
    how = draw(st.sampled_from(["flip", "truncate", "append", "random"]))
    if how == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        bit = 1 << draw(st.integers(0, 7))
        return data[:at] + bytes([data[at] ^ bit]) + data[at + 1 :]
    if how == "truncate":
        return data[: draw(st.integers(0, len(data)))]
    if how == "append":  # a field of any number and wire type: known numbers, wrong types
        field_number = draw(st.integers(1, 20))
        wire_type = draw(st.sampled_from([0, 1, 2, 5]))
        return data + bytes([field_number << 3 | wire_type]) + draw(st.binary(max_size=9))
    return draw(st.binary(max_size=64))


@st.composite
def messages_from(draw: st.DrawFn, event: cloudevents_pb2.CloudEvent) -> bytes:
    for name in draw(st.lists(st.sampled_from(sorted(BREAKAGES) + UNREADABLE * 3), max_size=2)):
        BREAKAGES[name](event, draw)
    data = event.SerializeToString()
    return draw(byte_mutations(data)) if draw(st.integers(0, 9)) == 9 else data


messages = valid_events().flatmap(messages_from)

# --- the properties ------------------------------------------------------------------------


def read_everything(envelope: Envelope) -> None:
    """What a handler may read; only InvalidEnvelope may come of it."""
    _ = (envelope.time, dict(envelope.extensions), envelope.subject, envelope.source)
    repr(envelope)


@FUZZ
@given(primer=messages, data=messages)
def test_decoding_is_total_and_agrees_with_the_spec(primer: bytes, data: bytes) -> None:
    """Whatever came before (the codec guesses the type of the last event), decoding ends
    in an envelope or UndecodableEvent; reading an envelope in InvalidEnvelope at worst."""
    outcomes = []
    for codec in (CloudEventsProtobufCodec(TypeRegistry([StringValue])), None):
        if codec is None:  # the same codec, primed by another message first
            codec = CloudEventsProtobufCodec(TypeRegistry([StringValue]))
            with contextlib.suppress(UndecodableEvent):
                codec.decode(primer)
        try:
            envelope = codec.decode(data)
        except UndecodableEvent as error:
            outcomes.append(("dead", error.reason))
            continue
        try:
            read_everything(envelope)
        except InvalidEnvelope as error:
            outcomes.append(("unreadable", error.reason))
        else:
            outcomes.append(("ok", envelope.id))
    assert outcomes[0] == outcomes[1]
    want = expected(data)
    if want.dead:
        assert outcomes[0] == ("dead", want.dead)
    elif want.times_hold:
        assert outcomes[0] == ("ok", want.event_id)
    else:
        assert outcomes[0] == ("unreadable", "invalid-envelope")


def reading_router(handled: list[str]) -> Router:
    """Emits; reads every attribute first when its value's length is even: a lazy read is
    reached by the handler, or (the correlation id alone) by the loop building the emitted
    event."""
    router = Router()

    @router.handles(StringValue)
    async def handle(event: StringValue, ctx: Context) -> None:
        if len(event.value) % 2 == 0:
            read_everything(ctx.envelope)
        handled.append(ctx.envelope.id)
        ctx.emit(Int64Value(value=len(event.value)))

    return router


@FUZZ
@given(batch=st.lists(messages, min_size=1, max_size=12))
def test_the_loop_parks_each_bad_message_once_and_handles_each_good_one_once(
    batch: list[bytes],
) -> None:
    handled: list[str] = []
    service = ServiceHarness(reading_router(handled), **FAST, max_message_bytes=MAX_BYTES)
    topic = service.settings.topic_for(KNOWN_TYPE)
    for data in batch:
        service.publish_raw(data, topic)

    asyncio.run(service.run_until_idle())  # raises whatever escaped the loop

    check_the_loop(service, handled, [(data, expected(data, MAX_BYTES)) for data in batch])


def check_the_loop(
    service: ServiceHarness, handled: list[str], published: list[tuple[bytes, Expected]]
) -> None:
    """The loop parked each bad message once with the oracle's reason, and handled each
    good event once (`published`: each message's bytes and what it must come to)."""
    want_parked: Counter[tuple[bytes, str]] = Counter()
    want_handled: list[str] = []
    seen: set[str] = set()
    for data, want in published:
        if want.dead:
            want_parked[data, want.dead] += 1
        elif want.event_id not in seen:  # later deliveries of an id are duplicates
            seen.add(want.event_id)
            if want.handled:
                want_handled.append(want.event_id)
            else:
                want_parked[data, want.parked_as] += 1
    assert Counter((parcel.body, parcel.reason) for parcel in service.dead_letters) == want_parked
    # Each good one handled once. (A handler that did not read a bad correlation id has run
    # when the loop finds it building the emitted event: its event is parked, not counted.)
    assert service.stats.handled == len(want_handled)
    assert set(want_handled) <= set(handled)
    assert len(handled) == len(set(handled))
    assert service.stats.retries == 0  # nothing here is transient
    assert service.bus.pending(service.group) == 0


# --- CloudEvents from other producers: binary and structured JSON modes ------------------
# The same oracle's outcomes for events as a producer on the CloudEvents SDK sends them
# (runtime/modes.py; docs/producers.md says what each mode must come to).

PROTOBUF_TYPES = [None, "application/protobuf", "application/x-protobuf; proto=x"]
JSON_TYPES = ["application/json", "text/json; charset=utf-8", "application/vnd.x+json"]
OTHER_TYPES = ["text/plain", "application/xml"]
STRUCTURED_JSON = {"content-type": "application/cloudevents+json; charset=utf-8"}
good_times = st.datetimes(timezones=st.just(UTC)).map(lambda t: t.isoformat())
bad_times = st.sampled_from(["yesterday", "2026-13-01T00:00:00Z", "12:00"])
json_values = st.one_of(texts, st.integers(), st.none(), st.lists(texts, max_size=2))


@dataclass(frozen=True)
class Foreign:
    """An event in another mode: its bytes and headers, and what it must come to."""

    body: bytes
    headers: dict[str, str]
    want: Expected


@st.composite
def foreign_attributes(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """Attributes as another producer sets them, perhaps one broken; what is wrong with
    them ("" if nothing), as the spec says."""
    attributes: dict[str, Any] = {
        "specversion": "1.0",
        "id": draw(ids),
        "source": "urn:fuzz",
        "type": draw(st.sampled_from([KNOWN_TYPE, KNOWN_TYPE, OTHER_TYPE])),
    }
    for name in draw(st.lists(st.sampled_from(sorted(attributes)), max_size=1)):
        if draw(st.booleans()):
            del attributes[name]
        else:
            attributes[name] = draw(st.sampled_from(["", "0.3"]))
    if draw(st.booleans()):
        attributes["time"] = draw(good_times | bad_times)
    if draw(st.booleans()):
        attributes["subject"] = draw(texts)
    names = st.sampled_from(["traceparent", "correlationid", "tenant"])
    attributes.update(draw(st.dictionaries(names, texts, max_size=2)))
    required = [attributes.get(name) for name in ("id", "source", "type")]
    if not all(required) or attributes.get("specversion") != "1.0":
        return attributes, "invalid-envelope"
    if "time" in attributes:
        try:
            datetime.fromisoformat(attributes["time"])
        except ValueError:
            return attributes, "invalid-envelope"
    return attributes, ""


def data_outcome(content_type: str | None, data: bytes | None, json_data: object) -> str:
    """What StringValue data comes to ("" when it fits): protobuf bytes (`data`), or a
    JSON value (`json_data`, when `data` is None), read as the content type says."""
    media = (content_type or "").partition(";")[0].strip()
    if data is not None and media in ("", "application/protobuf", "application/x-protobuf"):
        try:
            StringValue.FromString(data)
        except DecodeError:
            return "schema-mismatch"
        return ""
    if media not in ("", "application/json", "text/json") and not media.endswith("+json"):
        return "unsupported-content-type"
    if data is not None:
        try:
            json_data = json.loads(data)
        except ValueError:
            return "undecodable"
    return "" if isinstance(json_data, str) else "json-mismatch"


def foreign_expected(attributes: dict[str, Any], wrong: str, data: str) -> Expected:
    if wrong:
        return Expected(dead=wrong)
    if attributes["type"] != KNOWN_TYPE:
        return Expected(event_id=attributes["id"], known=False)
    if data:
        return Expected(dead=data)
    return Expected(event_id=attributes["id"], known=True)


@st.composite
def binary_events(draw: st.DrawFn) -> Foreign:
    attributes, wrong = draw(foreign_attributes())
    prefix = draw(st.sampled_from(BINARY_PREFIXES))
    headers = {prefix + name: str(value) for name, value in attributes.items()}
    if "specversion" not in attributes:  # else it is no binary-mode message at all
        headers[prefix + "specversion"] = "0.3"
    content_type = draw(st.sampled_from(PROTOBUF_TYPES + JSON_TYPES + OTHER_TYPES))
    if content_type is not None:
        headers["content-type"] = content_type
    value = draw(texts)
    body = draw(
        st.sampled_from([StringValue(value=value).SerializeToString(), json.dumps(value).encode()])
        | st.builds(lambda v: json.dumps(v).encode(), json_values)
        | st.binary(max_size=12)
    )
    return Foreign(
        body, headers, foreign_expected(attributes, wrong, data_outcome(content_type, body, None))
    )


@st.composite
def structured_events(draw: st.DrawFn) -> Foreign:
    attributes, wrong = draw(foreign_attributes())
    how = draw(st.sampled_from(["data", "data_base64", "none", "garbage"]))
    if how == "garbage":
        body = draw(st.sampled_from([b"", b"[1]", b"{", b"\xff"]) | st.binary(max_size=12))
        return Foreign(body, STRUCTURED_JSON, Expected(dead="undecodable"))
    data = "schema-mismatch"  # no data at all
    if how == "data":
        attributes["data"] = draw(json_values)
        data = data_outcome(None, None, attributes["data"])
    elif how == "data_base64":
        encoded = draw(
            st.builds(lambda v: StringValue(value=v).SerializeToString(), texts)
            | st.binary(max_size=12)
        )
        attributes["datacontenttype"] = "application/protobuf"
        attributes["data_base64"] = base64.b64encode(encoded).decode()
        data = data_outcome("application/protobuf", encoded, None)
    body = json.dumps(attributes).encode()
    return Foreign(body, STRUCTURED_JSON, foreign_expected(attributes, wrong, data))


foreign_events = binary_events() | structured_events()


@FUZZ
@given(event=foreign_events)
def test_other_modes_decode_totally_and_agree_with_the_spec(event: Foreign) -> None:
    modes = ContentModes(CloudEventsProtobufCodec(TypeRegistry([StringValue])))
    try:
        envelope = modes.decode_bytes(event.body, event.headers)
    except UndecodableEvent as error:
        assert ("dead", error.reason) == ("dead", event.want.dead)
        return
    read_everything(envelope)  # attributes of other modes are read when decoded
    assert not event.want.dead
    assert (envelope.id, envelope.payload is not None) == (event.want.event_id, event.want.known)


# Fewer batches than the native loop property: the decoding property above tries every
# mode's outcomes; this one checks that the loop mixes modes alike (CI's time budget).
@settings(FUZZ, max_examples=max(1, EXAMPLES // 3))
@given(
    batch=st.lists(
        foreign_events | messages.map(lambda data: Foreign(data, {}, expected(data, MAX_BYTES))),
        min_size=1,
        max_size=12,
    )
)
def test_the_loop_takes_every_mode_alike(batch: list[Foreign]) -> None:
    """Native and other producers' events mixed: the same id in two modes is a duplicate."""
    handled: list[str] = []
    service = ServiceHarness(reading_router(handled), **FAST, max_message_bytes=MAX_BYTES)
    topic = service.settings.topic_for(KNOWN_TYPE)
    for event in batch:
        service.publish_raw(event.body, topic, headers=event.headers)

    asyncio.run(service.run_until_idle())

    check_the_loop(service, handled, [(event.body, event.want) for event in batch])
