"""`<service> asyncapi`: an AsyncAPI 3.0 document of what this service consumes and
produces, built from its router and the protobuf descriptors of its event types.

Channels are the topics (Kafka) or routing keys on the topic exchange (RabbitMQ) that
`Settings.topic_for` gives each type. The service receives the types its handlers take
and sends the other types of its own package (proto/<package>/: the events it emits;
another team's types it has from the shared set are documented only where it handles
them). Each message is the CloudEvent in structured protobuf mode: the payload schema
shows its attributes with `data` as the event type's schema (protobuf's JSON mapping of
the descriptor), the headers the broker headers the service writes and reads.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from importlib.metadata import version
from typing import Any
from urllib.parse import urlsplit

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from .. import SERVICE_NAME, TEMPLATE_VERSION
from .brokers import ADAPTER_MODULES
from .config import PACKAGE_NAME, Settings, load_model
from .envelope import CONTENT_TYPE, PAYLOAD_CONTENT_TYPE, SPEC_VERSION, dataschema_of
from .router import Router

JsonObject = dict[str, Any]
KAFKA_BINDINGS = "0.5.0"
AMQP_BINDINGS = "0.3.0"
# Where the service's local stack (docker-compose.yml) listens, when BROKER_URL is memory://.
LOCAL_SERVERS = {"kafka": "localhost:9092", "rabbitmq": "localhost:5672"}


def _each(schema: JsonObject, *kinds: int) -> dict[int, JsonObject]:
    return {kind: schema for kind in kinds}


_SCALARS: dict[int, JsonObject] = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
    # 64-bit integers are JSON strings in protobuf's JSON mapping (a double loses digits).
    **_each(
        {"type": "string", "format": "int64"},
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_SFIXED64,
    ),
    **_each(
        {"type": "string", "format": "uint64"},
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_FIXED64,
    ),
    **_each(
        {"type": "integer", "format": "int32"},
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SFIXED32,
    ),
    **_each(
        {"type": "integer", "format": "uint32", "minimum": 0},
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_FIXED32,
    ),
}
# Well-known types with a JSON form of their own.
_WELL_KNOWN: dict[str, JsonObject] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?s$"},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array"},
    "google.protobuf.Any": {"type": "object", "required": ["@type"]},
}
_WRAPPERS = {
    "DoubleValue": FieldDescriptor.TYPE_DOUBLE,
    "FloatValue": FieldDescriptor.TYPE_FLOAT,
    "Int64Value": FieldDescriptor.TYPE_INT64,
    "UInt64Value": FieldDescriptor.TYPE_UINT64,
    "Int32Value": FieldDescriptor.TYPE_INT32,
    "UInt32Value": FieldDescriptor.TYPE_UINT32,
    "BoolValue": FieldDescriptor.TYPE_BOOL,
    "StringValue": FieldDescriptor.TYPE_STRING,
    "BytesValue": FieldDescriptor.TYPE_BYTES,
}
_WELL_KNOWN |= {f"google.protobuf.{name}": _SCALARS[kind] for name, kind in _WRAPPERS.items()}


class _Schemas:
    """JSON Schemas of protobuf messages, by full name (components/schemas)."""

    def __init__(self) -> None:
        self.found: dict[str, JsonObject] = {}

    def ref(self, descriptor: Any) -> JsonObject:  # a Descriptor (protobuf types it loosely)
        """A reference to the message's schema (built once); well-known types inline."""
        name = descriptor.full_name
        if name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[name])
        if name not in self.found:
            self.found[name] = {}  # a message that contains itself refers to this entry
            self.found[name] = self._message(descriptor)
        return {"$ref": f"#/components/schemas/{name}"}

    def _message(self, descriptor: Descriptor) -> JsonObject:
        properties = {field.json_name: self._field(field) for field in descriptor.fields}
        return {
            "type": "object",
            "title": descriptor.name,
            "x-protobuf-type": descriptor.full_name,
            "properties": properties,
        }

    def _field(self, field: FieldDescriptor) -> JsonObject:
        message = field.message_type
        if message is not None and message.GetOptions().map_entry:
            value = message.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self._single(value)}
        single = self._single(field)
        if field.is_repeated:
            return {"type": "array", "items": single}
        return single

    def _single(self, field: FieldDescriptor) -> JsonObject:
        if field.message_type is not None:
            return self.ref(field.message_type)
        if field.enum_type is not None:
            return _enum(field.enum_type)
        return dict(_SCALARS[field.type])


def _enum(descriptor: EnumDescriptor) -> JsonObject:
    # Names in JSON; numbers are accepted on input too.
    return {"type": "string", "enum": [value.name for value in descriptor.values]}


def baked_broker() -> str:
    """kafka or rabbitmq: the adapter this service was baked with."""
    for adapter in ("kafka", "rabbitmq"):
        try:
            importlib.import_module(f"{__package__}.brokers.{adapter}")
        except ModuleNotFoundError:
            continue
        return adapter
    raise RuntimeError("no broker adapter in this service")


def _server(settings: Settings, broker: str) -> JsonObject:
    """The broker from BROKER_URL (no credentials), or the local stack's."""
    url = urlsplit(settings.broker_url)
    if ADAPTER_MODULES.get(url.scheme) == broker:
        host = url.netloc.rpartition("@")[2]  # user:password@ never goes into a document
        description = "From BROKER_URL."
    else:
        host = LOCAL_SERVERS[broker]
        description = "The local stack (docker-compose.yml); production sets BROKER_URL."
    protocol = "kafka" if broker == "kafka" else url.scheme if url.scheme == "amqps" else "amqp"
    return {"host": host, "protocol": protocol, "description": description}


def _headers() -> JsonObject:
    return {
        "type": "object",
        "properties": {
            "content-type": {"type": "string", "const": CONTENT_TYPE},
            "traceparent": {"type": "string", "description": "W3C trace context"},
            "tracestate": {"type": "string", "description": "W3C trace context"},
        },
        "required": ["content-type"],
    }


def _cloudevent(message_type: type[Message], data: JsonObject) -> JsonObject:
    """The CloudEvent carrying one event type, attribute by attribute."""
    name = message_type.DESCRIPTOR.full_name
    text = {"type": "string"}
    return {
        "type": "object",
        "description": (
            "A CloudEvents 1.0 event in its protobuf format (io.cloudevents.v1.CloudEvent, "
            f"structured mode); `data`, a {name}, is packed as google.protobuf.Any."
        ),
        "properties": {
            "id": {**text, "description": "unique; consumers drop duplicates by it"},
            "source": {**text, "format": "uri-reference"},
            "specversion": {"type": "string", "const": SPEC_VERSION},
            "type": {"type": "string", "const": name},
            "subject": {**text, "description": "the ordering key (Kafka key)"},
            "time": {"type": "string", "format": "date-time"},
            "datacontenttype": {"type": "string", "const": PAYLOAD_CONTENT_TYPE},
            "dataschema": {"type": "string", "const": dataschema_of(message_type)},
            "causationid": {**text, "description": "id of the event this one answers"},
            "correlationid": {**text, "description": "id of the chain's first event"},
            "data": data,
        },
        "required": ["id", "source", "specversion", "type", "data"],
    }


def document(
    settings: Settings, router: Router, message_types: Iterable[type[Message]]
) -> JsonObject:
    """The AsyncAPI 3.0 document: `router`'s types received, the service's own other
    types among `message_types` sent."""
    broker = baked_broker()
    handled = {message_type.DESCRIPTOR.full_name for message_type in router.message_types()}
    own = f"{PACKAGE_NAME}."
    roles = [(message_type, "receive") for message_type in router.message_types()]
    roles += [
        (message_type, "send")
        for message_type in message_types
        if message_type.DESCRIPTOR.full_name.startswith(own)
        and message_type.DESCRIPTOR.full_name not in handled
    ]
    schemas = _Schemas()
    channels: JsonObject = {}
    operations: JsonObject = {}
    messages: JsonObject = {}
    for message_type, action in sorted(roles, key=lambda role: role[0].DESCRIPTOR.full_name):
        name = message_type.DESCRIPTOR.full_name
        topic = settings.topic_for(name)
        messages[name] = {
            "name": name,
            "title": message_type.DESCRIPTOR.name,
            "contentType": CONTENT_TYPE,
            "headers": _headers(),
            "payload": _cloudevent(message_type, schemas.ref(message_type.DESCRIPTOR)),
            "bindings": _message_bindings(broker, name),
        }
        channels[name] = {
            "address": topic,
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
            "bindings": _channel_bindings(broker, topic),
        }
        operation = {
            "action": action,
            "channel": {"$ref": f"#/channels/{name}"},
            "messages": [{"$ref": f"#/channels/{name}/messages/{name}"}],
            "bindings": _operation_bindings(broker, action, settings),
        }
        operations[f"{action}.{name}"] = operation
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": SERVICE_NAME,
            "version": version(SERVICE_NAME),
            "description": (
                f"Events {SERVICE_NAME} consumes and produces "
                f"(made from cookiecutter-event-service {TEMPLATE_VERSION})."
            ),
        },
        "defaultContentType": CONTENT_TYPE,
        "servers": {broker: _server(settings, broker)},
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": dict(sorted(schemas.found.items()))},
    }


def _channel_bindings(broker: str, topic: str) -> JsonObject:
    if broker == "kafka":
        return {"kafka": {"topic": topic, "bindingVersion": KAFKA_BINDINGS}}
    exchange = _rabbitmq_exchange()
    return {
        "amqp": {
            "is": "routingKey",
            "exchange": {"name": exchange, "type": "topic", "durable": True, "autoDelete": False},
            "bindingVersion": AMQP_BINDINGS,
        }
    }


def _operation_bindings(broker: str, action: str, settings: Settings) -> JsonObject:
    if broker == "kafka":
        if action == "send":
            return {"kafka": {"bindingVersion": KAFKA_BINDINGS}}
        group = {"type": "string", "enum": [settings.consumer_group]}
        return {"kafka": {"groupId": group, "bindingVersion": KAFKA_BINDINGS}}
    if action == "send":  # persistent, confirmed, returned when no queue is bound
        return {"amqp": {"deliveryMode": 2, "mandatory": True, "bindingVersion": AMQP_BINDINGS}}
    return {"amqp": {"ack": True, "bindingVersion": AMQP_BINDINGS}}


def _message_bindings(broker: str, name: str) -> JsonObject:
    if broker == "kafka":
        key = {"type": "string", "description": "the event's subject (ordering key)"}
        return {"kafka": {"key": key, "bindingVersion": KAFKA_BINDINGS}}
    return {"amqp": {"messageType": name, "bindingVersion": AMQP_BINDINGS}}


def _rabbitmq_exchange() -> str:
    """AMQP_EXCHANGE (the RabbitMQ adapter's setting; absent from a Kafka service)."""
    adapter = importlib.import_module(f"{__package__}.brokers.rabbitmq")
    return str(load_model(adapter.RabbitMQSettings).amqp_exchange)
