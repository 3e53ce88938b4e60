"""CloudEvents from producers that are not template services: events made with the
official `cloudevents` SDK, in each content mode its binding for this service's broker
has (binary and structured JSON; protobuf and JSON data), sent with the broker's plain
client, handled by the real loop. Template-owned; do not edit.
"""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.v1.event import CloudEvent
from google.protobuf.api_pb2 import Method
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from {{ cookiecutter.package_name }}.runtime import Context, Router
from {{ cookiecutter.package_name }}.runtime.brokers.base import DLQ_ERROR, DLQ_REASON
from {{ cookiecutter.package_name }}.runtime.envelope import event_type_of

from ..runtime.conftest import RunningLoop
from .conftest import Backend
from .test_conformance import loop_for, new_state

METHOD = event_type_of(Method)
PAYLOAD = Method(name="reserve", request_type_url="urn:x", request_streaming=True)
PAYLOAD_JSON = {"name": "reserve", "requestTypeUrl": "urn:x", "requestStreaming": True}


def sdk_event(event_id: str, data: Any, content_type: str, traceparent: str) -> CloudEvent:
    return CloudEvent(
        {
            "id": event_id,
            "source": "urn:go-producer",
            "type": METHOD,
            "subject": "order-7",
            "time": datetime.now(UTC),
            "datacontenttype": content_type,
            "traceparent": traceparent,
            # The Kafka binding's record key: a key's events share a partition, whose
            # dedupe window then sees a duplicate (RabbitMQ: one queue, one window).
            "partitionkey": "order-7",
        },
        data,
    )


def new_traceparent() -> tuple[str, int, int]:
    trace_id, span_id = uuid.uuid4().int, uuid.uuid4().int >> 64
    return f"00-{trace_id:032x}-{span_id:016x}-01", trace_id, span_id


async def test_sdk_events_in_every_mode_are_handled_deduplicated_traced_or_parked(
    real_backend: Backend, spans: InMemorySpanExporter
) -> None:
    modes = list(real_backend.support.SDK_MODES)  # type: ignore[union-attr]
    handled: list[tuple[str, Method]] = []
    router = Router()

    @router.handles(Method)
    async def handle(payload: Method, ctx: Context) -> None:
        handled.append((ctx.envelope.id, payload))

    settings = real_backend.settings()
    topic = settings.topic_for(METHOD)
    running = RunningLoop(loop_for(real_backend, settings, router, new_state()))
    await running.wait_started()
    sent: list[tuple[str, BaseCloudEvent]] = []
    traces: set[tuple[int, int]] = set()  # (trace id, parent span id) of each good event
    for mode in modes:
        for suffix, data, content_type in [
            ("pb", PAYLOAD.SerializeToString(), "application/protobuf"),
            ("json", PAYLOAD_JSON, "application/json"),
        ]:
            traceparent, trace_id, span_id = new_traceparent()
            traces.add((trace_id, span_id))
            sent.append((mode, sdk_event(f"{mode}-{suffix}", data, content_type, traceparent)))
        sent.append(sent[-1])  # a producer publishing twice
        bad = sdk_event(f"{mode}-bad", {"name": 5}, "application/json", new_traceparent()[0])
        sent.append((mode, bad))
    await real_backend.support.send_sdk_events(settings, topic, sent)  # type: ignore[union-attr]
    await running.wait_until(lambda: running.loop.stats.acked >= len(sent), deadline_s=60)
    await running.stop_gracefully()

    assert sorted(event_id for event_id, _ in handled) == sorted(
        f"{mode}-{suffix}" for mode in modes for suffix in ("pb", "json")
    )
    assert all(payload == PAYLOAD for _, payload in handled)
    assert running.loop.stats.duplicates == len(modes)
    parked = await real_backend.dead_letters(settings, topic, len(modes))
    assert Counter(headers[DLQ_REASON] for _, headers in parked) == {"json-mismatch": len(modes)}
    assert all("name" in headers[DLQ_ERROR] for _, headers in parked)
    consumed = {
        (span.context.trace_id, span.parent.span_id)
        for span in spans.get_finished_spans()
        if span.name == f"process {topic}" and span.parent is not None
    }
    assert traces <= consumed  # each handling span continues its producer's trace
