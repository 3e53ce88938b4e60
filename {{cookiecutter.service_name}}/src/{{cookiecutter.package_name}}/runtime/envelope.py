"""The single event envelope: CloudEvents 1.0 in its protobuf format, typed payloads as Any."""

from __future__ import annotations

import importlib
import pkgutil
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import ModuleType
from typing import Protocol

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import DecodeError, Message

from ..events import cloudevents_pb2
from .errors import UndecodableEvent

SPEC_VERSION = "1.0"
CONTENT_TYPE = "application/cloudevents+protobuf"
PAYLOAD_CONTENT_TYPE = "application/protobuf"
TYPE_URL_PREFIX = "type.googleapis.com/"
# Namespace for ids of emitted events: uuid5(namespace, "<parent id>#<position>").
EMIT_ID_NAMESPACE = uuid.UUID("6f1c6a3e-3f55-4b8e-9a51-0c1b7d2b9e10")

_CloudEvent = cloudevents_pb2.CloudEvent
_KNOWN_ATTRIBUTES = ("subject", "time", "datacontenttype", "dataschema")
_Attribute = cloudevents_pb2.CloudEvent.CloudEventAttributeValue


def derive_event_id(parent_id: str, position: int) -> str:
    """Id of the `position`-th event emitted while handling `parent_id`; stable across re-runs."""
    return str(uuid.uuid5(EMIT_ID_NAMESPACE, f"{parent_id}#{position}"))


def event_type_of(message: Message | type[Message]) -> str:
    """The CloudEvents `type` of a protobuf message: its full protobuf name."""
    return str(message.DESCRIPTOR.full_name)


@dataclass(frozen=True, slots=True)
class Envelope:
    """One event: CloudEvents attributes plus the decoded payload (None for unknown types)."""

    id: str
    type: str
    source: str
    payload: Message | None = None
    subject: str = ""
    time: datetime | None = None
    extensions: Mapping[str, str] = field(default_factory=dict)


class TypeRegistry:
    """Maps event type names to protobuf message classes."""

    def __init__(self, message_types: Iterable[type[Message]] = ()) -> None:
        self._types: dict[str, type[Message]] = {}
        for message_type in message_types:
            self.add(message_type)

    def add(self, message_type: type[Message]) -> None:
        self._types[event_type_of(message_type)] = message_type

    def get(self, type_name: str) -> type[Message] | None:
        return self._types.get(type_name)

    def names(self) -> list[str]:
        return sorted(self._types)

    @classmethod
    def from_package(cls, package: ModuleType) -> TypeRegistry:
        """Every message defined in the generated `*_pb2` modules of `package`."""
        registry = cls()
        for module_info in pkgutil.iter_modules(package.__path__):
            if not module_info.name.endswith("_pb2"):
                continue
            module = importlib.import_module(f"{package.__name__}.{module_info.name}")
            for name in module.DESCRIPTOR.message_types_by_name:
                message_type = getattr(module, name)
                if message_type is not _CloudEvent:
                    registry.add(message_type)
        return registry


class EnvelopeCodec(Protocol):
    """Turns envelopes into bytes and back. `decode` raises UndecodableEvent, never more."""

    content_type: str

    def encode(self, envelope: Envelope) -> bytes: ...

    def decode(self, data: bytes) -> Envelope: ...


class CloudEventsProtobufCodec:
    """CloudEvents protobuf format (io.cloudevents.v1.CloudEvent), payload in `proto_data`."""

    content_type = CONTENT_TYPE

    def __init__(self, registry: TypeRegistry) -> None:
        self.registry = registry

    def encode(self, envelope: Envelope) -> bytes:
        if envelope.payload is None:
            raise ValueError(f"envelope {envelope.id} has no payload to encode")
        event = _CloudEvent(
            id=envelope.id,
            source=envelope.source,
            spec_version=SPEC_VERSION,
            type=envelope.type,
        )
        attributes = event.attributes
        attributes["datacontenttype"].ce_string = PAYLOAD_CONTENT_TYPE
        attributes["dataschema"].ce_uri = TYPE_URL_PREFIX + envelope.type
        if envelope.subject:
            attributes["subject"].ce_string = envelope.subject
        if envelope.time is not None:
            attributes["time"].ce_timestamp.FromDatetime(envelope.time)
        for name, value in envelope.extensions.items():
            attributes[name].ce_string = value
        event.proto_data.Pack(envelope.payload, type_url_prefix=TYPE_URL_PREFIX)
        return event.SerializeToString()

    def decode(self, data: bytes) -> Envelope:
        event = _CloudEvent()
        try:
            event.ParseFromString(data)
        except DecodeError as error:
            raise UndecodableEvent("undecodable", f"not a CloudEvent protobuf: {error}") from None
        if event.spec_version != SPEC_VERSION or not event.id or not event.type:
            raise UndecodableEvent(
                "invalid-envelope",
                f"needs id, type and specversion {SPEC_VERSION} "
                f"(got id={event.id!r} type={event.type!r} specversion={event.spec_version!r})",
            )
        attributes = event.attributes
        # Direct lookups for the attributes every event has; a loop only for extensions.
        subject = attributes["subject"].ce_string if "subject" in attributes else ""
        time: datetime | None = None
        if "time" in attributes and attributes["time"].HasField("ce_timestamp"):
            time = _to_datetime(attributes["time"].ce_timestamp)
        extensions: dict[str, str] = {}
        if len(attributes) > sum(name in attributes for name in _KNOWN_ATTRIBUTES):
            extensions = {
                name: _attribute_text(value)
                for name, value in attributes.items()
                if name not in _KNOWN_ATTRIBUTES
            }
        return Envelope(
            id=event.id,
            type=event.type,
            source=event.source,
            payload=self._unpack(event),
            subject=subject,
            time=time,
            extensions=extensions,
        )

    def _unpack(self, event: cloudevents_pb2.CloudEvent) -> Message | None:
        message_type = self.registry.get(event.type)
        if message_type is None:
            return None  # the loop dead-letters unknown types; decoding itself succeeded
        if event.WhichOneof("data") != "proto_data":
            raise UndecodableEvent("schema-mismatch", f"{event.type} carries no protobuf payload")
        packed: any_pb2.Any = event.proto_data
        if packed.type_url.rpartition("/")[2] != event.type:  # any type URL prefix
            raise UndecodableEvent(
                "schema-mismatch", f"type {event.type} but payload is {packed.type_url}"
            )
        try:
            return message_type.FromString(packed.value)
        except DecodeError as error:
            raise UndecodableEvent("schema-mismatch", f"{event.type}: {error}") from None


def _to_datetime(timestamp: timestamp_pb2.Timestamp) -> datetime:
    # Timestamp.ToDatetime does the same through timegm, several times slower.
    moment = datetime.fromtimestamp(timestamp.seconds, UTC)
    return moment.replace(microsecond=timestamp.nanos // 1000)


def _attribute_text(value: cloudevents_pb2.CloudEvent.CloudEventAttributeValue) -> str:
    kind = value.WhichOneof("attr")
    if kind is None:
        return ""
    if kind == "ce_timestamp":
        return _to_datetime(value.ce_timestamp).isoformat()
    return str(getattr(value, kind))


def new_event_id() -> str:
    return str(uuid.uuid4())


def now() -> datetime:
    return datetime.now(UTC)
