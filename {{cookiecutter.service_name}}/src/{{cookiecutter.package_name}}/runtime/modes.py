"""CloudEvents from any producer: which content mode a delivery is in, decided from the
content type and headers its broker adapter hands over, and its decoding into an Envelope.

Accepted besides this service's own structured protobuf mode (which the intake sends
straight to the codec, see runtime/intake.py): binary content mode (attributes in `ce_`
headers on Kafka, `cloudEvents_` / `cloudEvents:` application properties on AMQP, `ce-`
headers as RabbitMQ's binding has them; `data` as the message body, protobuf or JSON) and
structured JSON mode (`application/cloudevents+json`; `data` as JSON or `data_base64`).
JSON data is read with protobuf's JSON mapping onto the type registered for `type`.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from .brokers.base import CONTENT_TYPE_HEADER, InboundMessage
from .envelope import CONTENT_TYPE, SPEC_VERSION, Envelope, EnvelopeCodec
from .errors import UndecodableEvent

STRUCTURED_JSON = "application/cloudevents+json"
# Binary mode's attribute name prefixes: Kafka binding, AMQP binding (both spellings),
# RabbitMQ binding (Knative's, and what the HTTP binding uses).
BINARY_PREFIXES = ("ce_", "cloudEvents_", "cloudEvents:", "ce-")
# `datacontenttype`s read as the registered type's protobuf encoding ("" when none given).
PROTOBUF_DATA = frozenset(
    {"", "application/protobuf", "application/x-protobuf", "application/vnd.google.protobuf"}
)
# Trace context that the CloudEvents distributed-tracing extension carries as attributes;
# copied into the delivery's headers (where tracing reads it) when they lack it.
TRACE_ATTRIBUTES = ("traceparent", "tracestate")
# Attributes that are not extensions (what the native codec keeps apart too).
_CORE = frozenset(
    {"id", "source", "type", "specversion", "subject", "time", "datacontenttype", "dataschema"}
)
_NO_DATA = object()


class ContentModes:
    """Decodes a delivery in whichever accepted mode it came; raises UndecodableEvent."""

    def __init__(self, codec: EnvelopeCodec) -> None:
        self.codec = codec
        self.registry = codec.registry

    def decode(self, message: InboundMessage) -> Envelope:
        """The delivery's event, in any mode. Trace context that another producer sent as
        CloudEvents attributes goes into the delivery's headers, where tracing reads it."""
        envelope, native = self._decode(message.body, message.headers)
        if native:
            return envelope  # its attributes are read when first used, not here
        extensions, headers = envelope.extensions, message.headers
        carried = {n: extensions[n] for n in TRACE_ATTRIBUTES if n in extensions}
        if carried and not any(name in headers for name in TRACE_ATTRIBUTES):
            message.headers = {**headers, **carried}
        return envelope

    def decode_bytes(self, body: bytes, headers: Mapping[str, str]) -> Envelope:
        """The event in `body`, in the mode its headers tell (operator reads, tests)."""
        return self._decode(body, headers)[0]

    def _decode(self, body: bytes, headers: Mapping[str, str]) -> tuple[Envelope, bool]:
        """The event, and whether it came in the native format."""
        found = other_mode(body, headers)
        if found is None:
            return self.codec.decode(body), True  # also a message without headers: native
        mode, attributes, data = found
        return self._envelope(attributes, data, mode), False

    def _envelope(self, attributes: Mapping[str, Any], data: object, mode: str) -> Envelope:
        """`data`: bytes (the body in binary mode, data_base64), a JSON value (structured
        mode's `data`), or _NO_DATA."""
        event_id, source, event_type = (attributes.get(n) for n in ("id", "source", "type"))
        specversion = attributes.get("specversion")
        if not (
            _text_given(event_id)
            and _text_given(source)
            and _text_given(event_type)
            and specversion == SPEC_VERSION
        ):
            raise UndecodableEvent(
                "invalid-envelope",
                f"{mode} mode: needs id, source, type and specversion {SPEC_VERSION} "
                f"(got id={event_id!r} source={source!r} type={event_type!r} "
                f"specversion={specversion!r})",
            )
        assert isinstance(event_id, str) and isinstance(source, str)
        assert isinstance(event_type, str)
        subject = attributes.get("subject")
        extensions = {
            name: _extension_text(name, value)
            for name, value in attributes.items()
            if name not in _CORE and value is not None
        }
        time = event_time(attributes.get("time"))  # the attributes are checked before the data
        media = _media_type(attributes.get("datacontenttype"))
        payload = self._payload(event_type, media, data)
        return Envelope(
            event_id,
            event_type,
            source,
            payload,
            subject if isinstance(subject, str) else "",
            time,
            extensions,
        )

    def _payload(self, event_type: str, media: str, data: object) -> Message | None:
        known = self.registry.unpacking.get(event_type)
        if known is None:
            return None  # the intake dead-letters unknown types once it deduped them
        message_type = known[0]
        if data is _NO_DATA:
            raise UndecodableEvent("schema-mismatch", f"{event_type} carries no data")
        json_data = media in ("", "text/json", "application/json") or media.endswith("+json")
        if isinstance(data, bytes):
            if media in PROTOBUF_DATA:
                try:
                    return message_type.FromString(data)
                except DecodeError as error:
                    raise UndecodableEvent("schema-mismatch", f"{event_type}: {error}") from None
            if not json_data:
                raise UndecodableEvent(
                    "unsupported-content-type",
                    f"{event_type} data of content type {media!r}: protobuf or JSON is accepted",
                )
            try:
                data = json.loads(data)
            except (ValueError, RecursionError) as error:
                raise UndecodableEvent("undecodable", f"data is not JSON: {error}") from None
        elif not json_data:  # structured mode's `data` is JSON whatever its content type says
            raise UndecodableEvent(
                "unsupported-content-type",
                f"{event_type} data of content type {media!r} in JSON 'data' "
                "(send it in data_base64)",
            )
        # Fields this schema does not know are ignored, as the binary format does: a
        # producer may add fields (a compatible change) before its consumers know them.
        try:
            # A JSON value of any kind: well-known types (wrappers, Timestamp) map from scalars.
            value: Any = data
            return json_format.ParseDict(value, message_type(), ignore_unknown_fields=True)
        except (json_format.ParseError, ValueError, TypeError, RecursionError) as error:
            raise UndecodableEvent("json-mismatch", f"{event_type}: {error}") from None


def other_mode(
    body: bytes, headers: Mapping[str, str]
) -> tuple[str, dict[str, Any], object] | None:
    """(mode, attributes, data) of an event in binary or structured JSON mode, its data
    not yet read; None when the content type and headers say the native format (or say
    nothing). Raises UndecodableEvent for any other format."""
    content_type = headers.get(CONTENT_TYPE_HEADER)
    media = _media_type(content_type)
    if media == STRUCTURED_JSON:
        return ("structured", *_structured_json(body))
    if media == CONTENT_TYPE:
        return None
    if media.startswith("application/cloudevents"):
        raise UndecodableEvent(
            "unsupported-content-type",
            f"structured mode {content_type!r} is not accepted "
            f"({CONTENT_TYPE} or {STRUCTURED_JSON} are)",
        )
    if (prefix := _binary_prefix(headers)) is not None:
        start = len(prefix)
        attributes: dict[str, Any] = {
            name[start:]: value for name, value in headers.items() if name.startswith(prefix)
        }
        # Binary mode: the message's content type is the data's (every binding agrees).
        attributes["datacontenttype"] = content_type
        return "binary", attributes, body
    if media:
        raise UndecodableEvent(
            "undecodable",
            f"content type {content_type!r} is no CloudEvents format, and no binary-"
            f"mode headers ({', '.join(p + 'specversion' for p in BINARY_PREFIXES)})",
        )
    return None


def _structured_json(body: bytes) -> tuple[dict[str, Any], object]:
    try:
        attributes = json.loads(body)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise UndecodableEvent("undecodable", f"not a CloudEvent in JSON: {error}") from None
    if not isinstance(attributes, dict):
        raise UndecodableEvent("undecodable", "not a CloudEvent in JSON: not an object")
    data = attributes.pop("data", _NO_DATA)
    encoded = attributes.pop("data_base64", _NO_DATA)
    if encoded is not _NO_DATA:
        if data is not _NO_DATA:
            raise UndecodableEvent("invalid-envelope", "has both data and data_base64")
        try:
            if not isinstance(encoded, str):
                raise ValueError(f"a JSON {type(encoded).__name__}, not a string")
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as error:
            raise UndecodableEvent("undecodable", f"data_base64 is not base64: {error}") from None
    return attributes, data


def _binary_prefix(headers: Mapping[str, str]) -> str | None:
    for prefix in BINARY_PREFIXES:
        if prefix + "specversion" in headers:
            return prefix
    return None


def _media_type(content_type: object) -> str:
    """`application/json; charset=utf-8` -> `application/json`; "" when none is given."""
    if not isinstance(content_type, str):
        return ""
    return content_type.partition(";")[0].strip().lower()


def _text_given(value: object) -> bool:
    return isinstance(value, str) and value != ""


def _extension_text(name: str, value: object) -> str:
    """An extension's canonical string (CloudEvents type system: string, integer, boolean)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int):
        return str(value)
    raise UndecodableEvent(
        "invalid-envelope", f"extension {name!r} is {type(value).__name__}, not a scalar value"
    )


def event_time(value: object) -> datetime | None:
    """RFC 3339 text, or an AMQP timestamp (milliseconds since the epoch, as the AMQP
    binding's native form arrives in a header); a time without zone is UTC."""
    if value is None or value == "":
        return None
    try:
        if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
            return datetime.fromtimestamp(int(value) / 1000, UTC)
        if isinstance(value, str):
            found = datetime.fromisoformat(value)
            return found if found.tzinfo is not None else found.replace(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        pass
    raise UndecodableEvent("invalid-envelope", f"attribute 'time' is not RFC 3339: {value!r}")
