"""CloudEvents from any producer (runtime/modes.py): binary content mode and structured
JSON mode, data as protobuf or JSON, through the real loop on the memory bus.

Template-owned; do not edit.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from google.protobuf.api_pb2 import Method
from google.protobuf.wrappers_pb2 import Int64Value

from {{ cookiecutter.package_name }}.runtime import Context, Router
from {{ cookiecutter.package_name }}.runtime.envelope import Envelope, event_type_of
from {{ cookiecutter.package_name }}.runtime.testing import ServiceHarness

from .conftest import FAST

METHOD = event_type_of(Method)
TIME = "2026-05-04T03:02:01.5Z"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
PAYLOAD = Method(name="reserve", request_type_url="urn:x", request_streaming=True)
PAYLOAD_JSON = {"name": "reserve", "requestTypeUrl": "urn:x", "requestStreaming": True}


def attributes(event_id: str, **more: Any) -> dict[str, Any]:
    """A CloudEvent's attributes as another producer sets them."""
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": "urn:java-producer",
        "type": METHOD,
        "subject": "order-7",
        "time": TIME,
        "correlationid": "c-1",
        **more,
    }


def binary(prefix: str, event_id: str, content_type: str | None, **more: Any) -> dict[str, str]:
    """Binary-mode headers: every attribute under `prefix`, the data's content type."""
    headers = {prefix + name: str(value) for name, value in attributes(event_id, **more).items()}
    if content_type is not None:
        headers["content-type"] = content_type
    return headers


def structured(event_id: str, **more: Any) -> bytes:
    return json.dumps(attributes(event_id, **more)).encode()


STRUCTURED = {"content-type": "application/cloudevents+json; charset=utf-8"}
PROTOBUF = PAYLOAD.SerializeToString()
JSON_DATA = json.dumps(PAYLOAD_JSON).encode()
# (body, headers) of one event in each accepted mode; all with the same attributes.
MODES: dict[str, tuple[bytes, dict[str, str]]] = {
    "kafka binary, protobuf": (PROTOBUF, binary("ce_", "e1", "application/protobuf")),
    "kafka binary, no content type": (PROTOBUF, binary("ce_", "e1", None)),
    "kafka binary, json": (JSON_DATA, binary("ce_", "e1", "application/json")),
    "amqp binary, json": (JSON_DATA, binary("cloudEvents_", "e1", "application/json")),
    "amqp binary (colon), protobuf": (
        PROTOBUF,
        binary("cloudEvents:", "e1", "application/x-protobuf"),
    ),
    "rabbitmq binary, json": (JSON_DATA, binary("ce-", "e1", "text/json; charset=utf-8")),
    "structured json, data": (structured("e1", data=PAYLOAD_JSON), STRUCTURED),
    "structured json, data_base64": (
        structured(
            "e1",
            datacontenttype="application/protobuf",
            data_base64=base64.b64encode(PROTOBUF).decode(),
        ),
        STRUCTURED,
    ),
}


def recording_router(seen: list[tuple[Envelope, Method]]) -> Router:
    """Records each Method event and emits one Int64Value for it."""
    router = Router()

    @router.handles(Method)
    async def handle(event: Method, ctx: Context) -> None:
        seen.append((ctx.envelope, event))
        ctx.emit(Int64Value(value=1))

    return router


async def run(*messages: tuple[bytes, dict[str, str]]) -> tuple[ServiceHarness, list[Any]]:
    seen: list[tuple[Envelope, Method]] = []
    service = ServiceHarness(recording_router(seen), **FAST)
    for body, headers in messages:
        service.publish_raw(body, service.settings.topic_for(METHOD), headers=headers)
    await service.run_until_idle()
    return service, seen


@pytest.mark.parametrize(("body", "headers"), MODES.values(), ids=MODES.keys())
async def test_each_mode_is_handled_with_its_attributes_and_a_duplicate_is_dropped(
    body: bytes, headers: dict[str, str]
) -> None:
    service, seen = await run((body, headers), (body, headers))

    [(envelope, payload)] = seen
    assert payload == PAYLOAD
    assert (envelope.id, envelope.type, envelope.source, envelope.subject) == (
        "e1",
        METHOD,
        "urn:java-producer",
        "order-7",
    )
    assert envelope.time == datetime(2026, 5, 4, 3, 2, 1, 500_000, tzinfo=UTC)
    assert envelope.extensions["correlationid"] == "c-1"
    assert service.stats.duplicates == 1
    assert service.dead_letters == []
    [emitted] = service.emitted(Int64Value)
    assert emitted.extensions["correlationid"] == "c-1"  # the chain's correlation carries on


async def test_the_same_event_in_another_mode_is_a_duplicate() -> None:
    service, seen = await run(*MODES.values())

    assert len(seen) == 1
    assert service.stats.duplicates == len(MODES) - 1


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (PROTOBUF, binary("ce_", "t1", "application/protobuf", traceparent=TRACEPARENT)),
        (structured("t1", data=PAYLOAD_JSON, traceparent=TRACEPARENT), STRUCTURED),
        (PROTOBUF, {**binary("ce_", "t1", "application/protobuf"), "traceparent": TRACEPARENT}),
    ],
    ids=["ce_traceparent header", "structured traceparent attribute", "traceparent header"],
)
async def test_the_trace_continues_from_a_traceparent_in_any_place(
    body: bytes, headers: dict[str, str]
) -> None:
    service, seen = await run((body, headers))

    assert len(seen) == 1
    [emitted] = [m for m in service.bus.published if m.topic != service.settings.topic_for(METHOD)]
    # The same trace: passed on as it came, or (with a tracing SDK) from the handling span.
    assert emitted.headers["traceparent"].split("-")[1] == TRACEPARENT.split("-")[1]


GOOD = (PROTOBUF, binary("ce_", "good", "application/protobuf"))
# A bad event in each mode: (body, headers, the dead-letter reason, words of its error).
BAD: dict[str, tuple[bytes, dict[str, str], str, str]] = {
    "binary without id": (
        PROTOBUF,
        {k: v for k, v in binary("ce_", "x", None).items() if k != "ce_id"},
        "invalid-envelope",
        "id=None",
    ),
    "binary specversion 0.3": (
        PROTOBUF,
        binary("ce_", "b2", None, specversion="0.3"),
        "invalid-envelope",
        "specversion='0.3'",
    ),
    "binary time not RFC 3339": (
        PROTOBUF,
        binary("ce_", "b3", None, time="yesterday"),
        "invalid-envelope",
        "time",
    ),
    "binary protobuf data not the type": (
        b"\xff\xff\xff",
        binary("ce_", "b4", "application/protobuf"),
        "schema-mismatch",
        METHOD,
    ),
    "binary json data not json": (
        b"{not json",
        binary("cloudEvents_", "b5", "application/json"),
        "undecodable",
        "not JSON",
    ),
    "binary json data not the type": (
        json.dumps({"name": 5}).encode(),
        binary("cloudEvents:", "b6", "application/json"),
        "json-mismatch",
        "name",
    ),
    "binary data of another content type": (
        b"reserve",
        binary("ce_", "b7", "text/plain"),
        "unsupported-content-type",
        "text/plain",
    ),
    "binary event of an unknown type": (
        PROTOBUF,
        binary("ce_", "b8", None, type="com.example.Other"),
        "unknown-type",
        "com.example.Other",
    ),
    "json content type without ce headers": (
        JSON_DATA,
        {"content-type": "application/json"},
        "undecodable",
        "no binary-mode headers",
    ),
    "structured not json": (b"\x00{", STRUCTURED, "undecodable", "not a CloudEvent in JSON"),
    "structured not an object": (b"[1]", STRUCTURED, "undecodable", "not an object"),
    "structured without data": (structured("s3"), STRUCTURED, "schema-mismatch", "no data"),
    "structured with data and data_base64": (
        structured("s4", data=PAYLOAD_JSON, data_base64=""),
        STRUCTURED,
        "invalid-envelope",
        "both",
    ),
    "structured data_base64 not base64": (
        structured("s5", data_base64="%%%"),
        STRUCTURED,
        "undecodable",
        "base64",
    ),
    "structured data_base64 not a string": (
        structured("s9", data_base64=12345678),
        STRUCTURED,
        "undecodable",
        "not a string",
    ),
    "structured json data not the type": (
        structured("s6", data={"requestStreaming": "maybe"}),
        STRUCTURED,
        "json-mismatch",
        "requestStreaming",
    ),
    "structured extension not a scalar": (
        structured("s7", data=PAYLOAD_JSON, tenant={"a": 1}),
        STRUCTURED,
        "invalid-envelope",
        "tenant",
    ),
    "structured xml data": (
        structured("s8", data="<a/>", datacontenttype="application/xml"),
        STRUCTURED,
        "unsupported-content-type",
        "data_base64",
    ),
    "batched mode": (
        b"[]",
        {"content-type": "application/cloudevents-batch+json"},
        "unsupported-content-type",
        "batch",
    ),
}


@pytest.mark.parametrize(("body", "headers", "reason", "words"), BAD.values(), ids=BAD.keys())
async def test_a_bad_event_in_any_mode_is_dead_lettered_with_its_reason(
    body: bytes, headers: dict[str, str], reason: str, words: str
) -> None:
    service, seen = await run(GOOD, (body, headers), (GOOD[0], binary("ce_", "after", None)))

    assert [envelope.id for envelope, _ in seen] == ["good", "after"]
    [parked] = service.dead_letters
    assert parked.reason == reason
    assert words in parked.error
    assert parked.body == body
    assert {name: parked.headers[name] for name in headers} == headers  # kept for a redrive
    assert service.stats.dead_lettered == {reason: 1}
