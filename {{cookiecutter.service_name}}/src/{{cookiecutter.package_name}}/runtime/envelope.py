"""The single event envelope: CloudEvents 1.0 in its protobuf format, typed payloads as Any."""

from __future__ import annotations

import hashlib
import importlib
import pkgutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import Any, Protocol, cast

from google.protobuf import any_pb2, descriptor_pb2, message_factory, timestamp_pb2
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError, Message

from ..events import cloudevents_pb2
from .errors import InvalidEnvelope, UndecodableEvent

SPEC_VERSION = "1.0"
CONTENT_TYPE = "application/cloudevents+protobuf"
PAYLOAD_CONTENT_TYPE = "application/protobuf"
TYPE_URL_PREFIX = "type.googleapis.com/"
# Namespace for ids of emitted events: uuid5(namespace, "<parent id>#<position>").
EMIT_ID_NAMESPACE = uuid.UUID("6f1c6a3e-3f55-4b8e-9a51-0c1b7d2b9e10")
_EMIT_ID_HASH = hashlib.sha1(EMIT_ID_NAMESPACE.bytes, usedforsecurity=False)

# Extensions every emitted event carries: the event it answers, and its chain's first.
CAUSATION_ID = "causationid"
CORRELATION_ID = "correlationid"

_CloudEvent = cloudevents_pb2.CloudEvent
_KNOWN_ATTRIBUTES = ("subject", "time", "datacontenttype", "dataschema")
_Attribute = cloudevents_pb2.CloudEvent.CloudEventAttributeValue
# Package of the parsing-only messages built per payload type (see _one_pass_parser).
_ONE_PASS_PACKAGE = "event_service_runtime.one_pass"
# What parses an envelope and its payload in one pass: its own parsed-message type.
_Parser = Callable[[bytes], Any]
_one_pass_parsers: dict[type[Message], _Parser | None] = {}
# The seconds a datetime can hold: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FIRST_SECOND = int((datetime(1, 1, 1, tzinfo=UTC) - _EPOCH).total_seconds())
_LAST_SECOND = int((datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC) - _EPOCH).total_seconds())


def derive_event_id(parent_id: str, position: int) -> str:
    """Id of the `position`-th event emitted while handling `parent_id`; stable across re-runs.

    `uuid.uuid5(EMIT_ID_NAMESPACE, f"{parent_id}#{position}")` as text, computed the way
    uuid5 does (SHA-1 over namespace and name, version 5, RFC 4122 variant) from a hash
    that already took the namespace, without building a UUID object: one per emitted event.
    """
    digest = _EMIT_ID_HASH.copy()
    digest.update(f"{parent_id}#{position}".encode())
    hex_digits = digest.hexdigest()
    variant = "89ab"[int(hex_digits[16], 16) & 3]  # the top two bits become 10
    return (
        f"{hex_digits[:8]}-{hex_digits[8:12]}-5{hex_digits[13:16]}-"
        f"{variant}{hex_digits[17:20]}-{hex_digits[20:32]}"
    )


def event_type_of(message: Message | type[Message]) -> str:
    """The CloudEvents `type` of a protobuf message: its full protobuf name."""
    return str(message.DESCRIPTOR.full_name)


def dataschema_of(message_type: type[Message]) -> str:
    """`dataschema` of the events of a type: `urn:protobuf:<type>:<schema version>`. The
    version is a fingerprint of the schema (see _schema_version): the same in every
    service that has the same .proto, changed by any change of a field (comments aside),
    so a consumer or the archive can tell which schema produced an event. Once per type."""
    uri = _dataschemas.get(message_type)
    if uri is None:
        descriptor = message_type.DESCRIPTOR
        uri = f"urn:protobuf:{descriptor.full_name}:{_schema_version(descriptor)}"
        _dataschemas[message_type] = uri
    return uri


_dataschemas: dict[type[Message], str] = {}


def _schema_version(descriptor: Any) -> str:
    """12 hex digits of the SHA-256 of the message's descriptor and those of the message
    and enum types its fields use, transitively (a change in a nested type counts)."""
    digest = hashlib.sha256()
    seen: set[str] = set()
    todo: list[Any] = [descriptor]
    while todo:
        current = todo.pop()
        if current.full_name in seen:
            continue
        seen.add(current.full_name)
        proto: Any = (
            descriptor_pb2.DescriptorProto()
            if isinstance(current, Descriptor)
            else descriptor_pb2.EnumDescriptorProto()
        )
        current.CopyToProto(proto)
        digest.update(current.full_name.encode() + b"\0")
        digest.update(proto.SerializeToString(deterministic=True))
        if isinstance(current, Descriptor):
            for field in current.fields:
                todo.extend(t for t in (field.message_type, field.enum_type) if t is not None)
    return digest.hexdigest()[:12]


class Envelope:
    """One event: CloudEvents attributes plus the decoded payload (None for unknown types).

    Read-only by contract. A decoded event's `time` and `extensions` are read from its
    bytes on first use: the loop never needs them, and most handlers do not either. (Only
    the bytes are kept meanwhile: holding the parsed message costs more than parsing again.)
    An attribute that cannot be read (a timestamp no datetime holds) raises InvalidEnvelope
    on every read, so whoever reads it first (a handler, or the loop building an emitted
    event) has the event dead-lettered.
    """

    __slots__ = (
        "_dataschema",
        "_extensions",
        "_time",
        "_wire",
        "id",
        "payload",
        "source",
        "subject",
        "type",
    )

    def __init__(
        self,
        id: str,
        type: str,
        source: str,
        payload: Message | None = None,
        subject: str = "",
        time: datetime | None = None,
        extensions: Mapping[str, str] | None = None,
        dataschema: str = "",
    ) -> None:
        self.id = id
        self.type = type
        self.source = source
        self.payload = payload
        self.subject = subject
        self._time = time
        self._dataschema = dataschema
        self._extensions: Mapping[str, str] = {} if extensions is None else extensions
        self._wire: bytes | None = None

    @property
    def time(self) -> datetime | None:
        if self._wire is not None:
            self._read_wire()
        return self._time

    @property
    def extensions(self) -> Mapping[str, str]:
        if self._wire is not None:
            self._read_wire()
        return self._extensions

    def extension(self, name: str) -> str | None:
        """One extension attribute's text, None if the event has none of that name. Of a
        decoded event it reads that attribute alone (the loop reads the correlation id of
        every event that emits; reading all of them costs several times more), so only
        that attribute can raise InvalidEnvelope here."""
        if self._wire is None:
            return self._extensions.get(name)
        if name in _KNOWN_ATTRIBUTES:
            return None
        value = _CloudEvent.FromString(self._wire).attributes.get(name)
        return None if value is None else _attribute_text(name, value)

    @property
    def dataschema(self) -> str:
        """The schema its producer named (`urn:protobuf:<type>:<version>` from a template
        service, see `dataschema_of`); "" if none. Encoding writes the payload's own."""
        if self._wire is not None:
            self._read_wire()
        return self._dataschema

    def _read_wire(self) -> None:
        assert self._wire is not None
        attributes = _CloudEvent.FromString(self._wire).attributes
        stamp = attributes.get("time")
        if stamp is not None and stamp.HasField("ce_timestamp"):
            self._time = _to_datetime("time", stamp.ce_timestamp)
        schema = attributes.get("dataschema")
        if schema is not None:
            self._dataschema = schema.ce_uri or _attribute_text("dataschema", schema)
        self._extensions = {
            name: _attribute_text(name, value)
            for name, value in attributes.items()
            if name not in _KNOWN_ATTRIBUTES
        }
        self._wire = None  # only once all was read: a failure fails every read alike

    def _fields(self) -> tuple[object, ...]:
        return (
            self.id,
            self.type,
            self.source,
            self.payload,
            self.subject,
            self.time,
            dict(self.extensions),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Envelope):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # payloads are mutable messages

    def __repr__(self) -> str:
        names = ("id", "type", "source", "payload", "subject", "time", "extensions")
        try:
            fields = self._fields()
        except InvalidEnvelope as error:  # repr serves logs and test reports: never raise
            return f"Envelope(id={self.id!r}, type={self.type!r}, invalid: {error.detail})"
        shown = ", ".join(f"{n}={v!r}" for n, v in zip(names, fields, strict=True))
        return f"Envelope({shown})"


class TypeRegistry:
    """Maps event type names to protobuf message classes."""

    def __init__(self, message_types: Iterable[type[Message]] = ()) -> None:
        # By type name: the class and the type URL it is packed under (what decoding
        # looks up per event).
        self.unpacking: dict[str, tuple[type[Message], str]] = {}
        for message_type in message_types:
            self.add(message_type)

    def add(self, message_type: type[Message]) -> None:
        type_name = event_type_of(message_type)
        self.unpacking[type_name] = (message_type, TYPE_URL_PREFIX + type_name)

    def get(self, type_name: str) -> type[Message] | None:
        known = self.unpacking.get(type_name)
        return known[0] if known is not None else None

    def names(self) -> list[str]:
        return sorted(self.unpacking)

    @classmethod
    def from_package(cls, package: ModuleType) -> TypeRegistry:
        """Every message defined in the generated `*_pb2` modules of `package`, its
        subpackages included (where other teams' files are generated)."""
        registry = cls()
        for module_info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if not module_info.name.endswith("_pb2"):
                continue
            module = importlib.import_module(module_info.name)
            for name in module.DESCRIPTOR.message_types_by_name:
                message_type = getattr(module, name)
                if message_type is not _CloudEvent:
                    registry.add(message_type)
        return registry


class EnvelopeCodec(Protocol):
    """Turns envelopes into bytes and back. `decode` raises UndecodableEvent, never more."""

    content_type: str
    registry: TypeRegistry  # what other content modes map their data onto (runtime/modes.py)

    def encode(self, envelope: Envelope) -> bytes: ...

    def decode(self, data: bytes) -> Envelope: ...


class CloudEventsProtobufCodec:
    """CloudEvents protobuf format (io.cloudevents.v1.CloudEvent), payload in `proto_data`.

    Decoding first tries the payload type of the event before it (a topic carries one
    type) with a message that reads the envelope and that payload in one parse; anything
    that does not fit that guess takes the general path, which alone decides what is wrong
    with an event.
    """

    content_type = CONTENT_TYPE

    def __init__(self, registry: TypeRegistry) -> None:
        self.registry = registry
        # (event type, its type URL, its one-pass parser) of the last event decoded.
        self._guess: tuple[str, str, _Parser] | None = None

    def encode(self, envelope: Envelope) -> bytes:
        if envelope.payload is None:
            raise ValueError(f"envelope {envelope.id} has no payload to encode")
        payload = envelope.payload
        # What Any.Pack does (the URL names the payload's own type), without its overhead.
        packed = any_pb2.Any(
            type_url=TYPE_URL_PREFIX + payload.DESCRIPTOR.full_name,
            value=payload.SerializeToString(),
        )
        event = _CloudEvent(
            id=envelope.id,
            source=envelope.source,
            spec_version=SPEC_VERSION,
            type=envelope.type,
            proto_data=packed,
        )
        attributes = event.attributes
        attributes["datacontenttype"].ce_string = PAYLOAD_CONTENT_TYPE
        attributes["dataschema"].ce_uri = dataschema_of(type(envelope.payload))
        if envelope.subject:
            attributes["subject"].ce_string = envelope.subject
        if envelope.time is not None:
            _set_timestamp(attributes["time"].ce_timestamp, envelope.time)
        for name, value in envelope.extensions.items():
            attributes[name].ce_string = value
        return event.SerializeToString()

    def decode(self, data: bytes) -> Envelope:
        guess = self._guess
        if guess is not None:
            event_type, type_url, parse = guess
            try:
                event = parse(data)
            except DecodeError:
                pass  # perhaps another type; the general path tells
            else:
                packed = event.proto_data
                found_url = packed.type_url
                event_id = event.id
                if (
                    event.type == event_type
                    and event_id
                    and event.source
                    and event.spec_version == SPEC_VERSION
                    and (found_url == type_url or _packs(found_url, type_url, event_type))
                ):
                    return _envelope(event, event_id, event_type, packed.value, data)
        return self._decode_any(data)

    def _decode_any(self, data: bytes) -> Envelope:
        try:
            event = _CloudEvent.FromString(data)
        except DecodeError as error:
            raise UndecodableEvent("undecodable", f"not a CloudEvent protobuf: {error}") from None
        event_id, event_type = event.id, event.type
        if not event_id or not event_type or not event.source or event.spec_version != SPEC_VERSION:
            raise UndecodableEvent(
                "invalid-envelope",
                f"needs id, source, type and specversion {SPEC_VERSION} (got id={event_id!r} "
                f"source={event.source!r} type={event_type!r} specversion={event.spec_version!r})",
            )
        return _envelope(event, event_id, event_type, self._unpack(event, event_type), data)

    def _unpack(self, event: cloudevents_pb2.CloudEvent, event_type: str) -> Message | None:
        known = self.registry.unpacking.get(event_type)
        if known is None:
            return None  # the loop dead-letters unknown types; decoding itself succeeded
        message_type, type_url = known
        packed: any_pb2.Any = event.proto_data  # an empty Any if the data is not protobuf
        if not _packs(packed.type_url, type_url, event_type):
            if event.WhichOneof("data") != "proto_data":
                detail = f"{event_type} carries no protobuf payload"
            else:
                detail = f"type {event_type} but payload is {packed.type_url}"
            raise UndecodableEvent("schema-mismatch", detail)
        try:
            payload = message_type.FromString(packed.value)
        except DecodeError as error:
            raise UndecodableEvent("schema-mismatch", f"{event_type}: {error}") from None
        parse = _one_pass_parser(message_type)
        if parse is not None:
            self._guess = (event_type, type_url, parse)
        return payload


def _packs(found_url: str, type_url: str, event_type: str) -> bool:
    """Whether an Any's type URL names `event_type`: the URL this codec writes (compared
    first, no parsing), or the same type under any other producer's prefix."""
    return found_url == type_url or found_url.rpartition("/")[2] == event_type


def _envelope(
    event: Any, event_id: str, event_type: str, payload: Message | None, data: bytes
) -> Envelope:
    """`event` is a CloudEvent, or the one-pass message with the same attributes; its id
    and type were read already (a type string is shared by all events of the type)."""
    envelope = Envelope(
        event_id,
        event_type,
        event.source,
        payload,
        # Indexing adds an empty attribute when there is none (its text is ""): cheaper
        # than .get(), and this parsed copy is dropped after decoding.
        event.attributes["subject"].ce_string,
    )
    envelope._wire = data
    return envelope


def _one_pass_parser(message_type: type[Message]) -> _Parser | None:
    """Parses a message with CloudEvent's wire format whose `proto_data` is an Any with
    `value` declared as `message_type` (bytes and an embedded message look alike on the
    wire): the envelope and its payload in one parse, the payload bytes never copied out.
    None when the payload's descriptor pool cannot hold it (the general path then serves)."""
    if message_type not in _one_pass_parsers:
        _one_pass_parsers[message_type] = _build_one_pass_parser(message_type)
    return _one_pass_parsers[message_type]


def _build_one_pass_parser(message_type: type[Message]) -> _Parser | None:
    payload = message_type.DESCRIPTOR
    pool = payload.file.pool
    package = f"{_ONE_PASS_PACKAGE}.{payload.full_name}"
    name = f"{package}.CloudEvent"
    try:
        return _parser_of(pool.FindMessageTypeByName(name))
    except KeyError:
        pass  # not built yet (another codec in this process may have built it)
    cloud_event = _CloudEvent.DESCRIPTOR
    file = descriptor_pb2.FileDescriptorProto(
        name=f"{package.replace('.', '/')}.proto",
        package=package,
        syntax="proto3",
        dependency=sorted({cloud_event.file.name, payload.file.name}),
    )
    envelope = file.message_type.add()
    cloud_event.CopyToProto(envelope)
    # The attribute values stay CloudEvent's own type; only the map entry must be nested.
    kept = [nested for nested in envelope.nested_type if nested.options.map_entry]
    del envelope.nested_type[:]
    envelope.nested_type.extend(kept)
    for envelope_field in envelope.field:
        if envelope_field.name == "attributes":
            envelope_field.type_name = f".{package}.CloudEvent.AttributesEntry"
        elif envelope_field.name == "proto_data":
            envelope_field.type_name = f".{package}.Any"
    packed = file.message_type.add(name="Any")
    text, message, optional = (
        descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
        descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    packed.field.add(name="type_url", number=1, type=text, label=optional)
    packed.field.add(
        name="value", number=2, type=message, label=optional, type_name=f".{payload.full_name}"
    )
    try:
        pool.Add(file)
        return _parser_of(pool.FindMessageTypeByName(name))
    except (TypeError, KeyError, ValueError):
        return None


def _parser_of(descriptor: object) -> _Parser:
    parse: _Parser = message_factory.GetMessageClass(cast(Descriptor, descriptor)).FromString
    return parse


def _to_datetime(attribute: str, timestamp: timestamp_pb2.Timestamp) -> datetime:
    """The attribute's timestamp; InvalidEnvelope if no datetime holds it. (Arithmetic on
    the epoch: fromtimestamp's limits depend on the platform, ToDatetime is slower.)"""
    seconds, nanos = timestamp.seconds, timestamp.nanos
    if not (_FIRST_SECOND <= seconds <= _LAST_SECOND and 0 <= nanos <= 999_999_999):
        raise InvalidEnvelope(
            f"attribute {attribute!r} is not a time a datetime holds "
            f"(seconds={seconds}, nanos={nanos}; years 1-9999, nanos 0-999999999)"
        )
    return _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)


def _set_timestamp(timestamp: timestamp_pb2.Timestamp, moment: datetime) -> None:
    """What Timestamp.FromDatetime does (a naive datetime is UTC), by arithmetic on the
    epoch: FromDatetime costs more than the rest of encoding an event."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    since = moment - _EPOCH
    timestamp.seconds = since.days * 86_400 + since.seconds
    timestamp.nanos = since.microseconds * 1000


def _attribute_text(name: str, value: cloudevents_pb2.CloudEvent.CloudEventAttributeValue) -> str:
    kind = value.WhichOneof("attr")
    if kind is None:
        return ""
    if kind == "ce_timestamp":
        return _to_datetime(name, value.ce_timestamp).isoformat()
    return str(getattr(value, kind))


def new_event_id() -> str:
    return str(uuid.uuid4())


def now() -> datetime:
    return datetime.now(UTC)
