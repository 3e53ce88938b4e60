"""Traces follow an event across services; logs carry event and trace fields. Template-owned."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from google.protobuf.wrappers_pb2 import Int64Value, StringValue
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from {{ cookiecutter.package_name }}.runtime import Context, Router
from {{ cookiecutter.package_name }}.runtime.app import build_loop
from {{ cookiecutter.package_name }}.runtime.brokers.memory import MemoryBroker, MemoryBus
from {{ cookiecutter.package_name }}.runtime.config import Settings
from {{ cookiecutter.package_name }}.runtime.logs import configure_logging
from {{ cookiecutter.package_name }}.runtime.state.memory import MemoryStateStore
from {{ cookiecutter.package_name }}.runtime.telemetry import _exporter_names, inject
from {{ cookiecutter.package_name }}.runtime.testing import ServiceHarness

from .conftest import FAST, RunningLoop, fast_settings, make_loop, one_span, publish_to


async def test_a_trace_follows_an_event_from_one_service_to_the_next(
    spans: InMemorySpanExporter,
) -> None:
    bus = MemoryBus()
    service_a, service_b = Router(), Router()

    @service_a.handles(StringValue)
    async def react(event: StringValue, ctx: Context) -> None:
        ctx.emit(Int64Value(value=len(event.value)), key="k")

    @service_b.handles(Int64Value)
    async def finish(event: Int64Value, ctx: Context) -> None:
        return None

    loops = []
    for name, router in (("service-a", service_a), ("service-b", service_b)):
        settings = fast_settings(consumer_group=name, event_source=f"urn:service:{name}")
        bus.bind(name, router.event_types())
        loops.append(
            RunningLoop(make_loop(router, bus, MemoryStateStore(100, 60, time.time), settings))
        )
    with trace.get_tracer("test").start_as_current_span("client", kind=SpanKind.PRODUCER):
        headers: dict[str, str] = {}
        inject(headers)
        await publish_to(bus, service_a, StringValue(value="abc"), key="k", headers=headers)
    await loops[1].wait_until(lambda: loops[1].loop.stats.handled == 1)
    for running in loops:
        await running.stop_gracefully()

    finished = list(spans.get_finished_spans())
    client = one_span(finished, "client")
    consume_a = one_span(finished, "process google.protobuf.StringValue")
    produce_a = one_span(finished, "send google.protobuf.Int64Value")
    consume_b = one_span(finished, "process google.protobuf.Int64Value")
    assert {s.context.trace_id for s in (client, consume_a, produce_a, consume_b)} == {
        client.context.trace_id
    }
    assert consume_a.parent is not None and consume_a.parent.span_id == client.context.span_id
    assert produce_a.parent is not None and produce_a.parent.span_id == consume_a.context.span_id
    assert consume_b.parent is not None and consume_b.parent.span_id == produce_a.context.span_id
    assert (consume_a.kind, produce_a.kind, consume_b.kind) == (
        SpanKind.CONSUMER,
        SpanKind.PRODUCER,
        SpanKind.CONSUMER,
    )
    assert consume_b.attributes is not None
    assert consume_b.attributes["messaging.consumer.group.name"] == "service-b"
    assert consume_b.attributes["messaging.destination.name"] == "google.protobuf.Int64Value"
    assert consume_b.attributes["messaging.operation.type"] == "process"
    assert consume_b.attributes["cloudevents.event_source"] == "urn:service:service-a"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging binds the current stdout: undo it after a test captured stdout."""
    saved_structlog = structlog.get_config()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    yield
    structlog.configure(**saved_structlog)
    root.handlers, root.level = saved_handlers, saved_level


@pytest.mark.usefixtures("restore_logging")
async def test_log_lines_inside_a_handler_carry_event_and_trace_fields(
    spans: InMemorySpanExporter, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(Settings(log_format="json", log_level="INFO"))
    router = Router()

    @router.handles(StringValue)
    async def talk(event: StringValue, ctx: Context) -> None:
        ctx.log.warning("inside the handler")

    service = ServiceHarness(router, **FAST)
    event_id = await service.publish(StringValue(value="x"), key="order-1")
    await service.run_until_idle()
    logging.getLogger("aiokafka").warning("a library speaks")

    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    [inside] = [line for line in lines if line["event"] == "inside the handler"]
    assert inside["event_id"] == event_id
    assert inside["event_type"] == "google.protobuf.StringValue"
    assert inside["subject"] == "order-1"
    assert inside["attempt"] == 1
    assert {"stream", "position", "event_source", "timestamp", "level"} <= inside.keys()
    [span] = [s for s in spans.get_finished_spans() if s.name.startswith("process")]
    assert inside["trace_id"] == format(span.context.trace_id, "032x")
    assert inside["span_id"] == format(span.context.span_id, "016x")
    [library] = [line for line in lines if line["event"] == "a library speaks"]
    assert library["logger"] == "aiokafka"


def test_exporters_are_chosen_by_the_standard_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert _exporter_names("traces") == []  # nothing configured: nothing exported
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    assert _exporter_names("traces") == ["otlp"]
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    assert _exporter_names("traces") == ["console"]
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert _exporter_names("traces") == []


async def test_metrics_count_outcomes_and_report_lag() -> None:
    reader = InMemoryMetricReader()
    bus = MemoryBus()
    settings = fast_settings()
    router = Router()

    @router.handles(StringValue)
    async def handle(event: StringValue, ctx: Context) -> None:
        if event.value == "bad":
            raise ctx.DeadLetter("refused", "by the test")

    bus.bind(settings.consumer_group, router.event_types())
    first = await publish_to(bus, router, StringValue(value="a"))
    await publish_to(bus, router, StringValue(value="a"), event_id=first)
    await publish_to(bus, router, StringValue(value="bad"))
    loop = build_loop(
        settings,
        router,
        broker=MemoryBroker(bus, settings.consumer_group),
        state=MemoryStateStore(100, 3600, time.time),
        meter_provider=MeterProvider(metric_readers=[reader]),
    )
    running = RunningLoop(loop)
    await running.wait_until(lambda: bus.pending(settings.consumer_group) == 0)
    await running.stop_gracefully()

    data = reader.get_metrics_data()
    assert data is not None
    points: dict[tuple[str, Any], Any] = {
        (metric.name, tuple(sorted((point.attributes or {}).items()))): point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        for point in metric.data.data_points
    }
    assert points[("events.handled", ())].value == 1
    assert points[("events.duplicates", ())].value == 1
    assert points[("events.dead_lettered", (("reason", "refused"),))].value == 1
    assert points[("batch.size", ())].sum == 3
    assert points[("checkpoint.duration", ())].count >= 1
    # Asked before the first fetch: all three messages were waiting.
    assert points[("events.consumer.lag", (("stream", settings.consumer_group),))].value == 3


async def test_without_tracing_the_trace_context_passes_through_unchanged() -> None:
    bus = MemoryBus()
    settings = fast_settings()
    router = Router()

    @router.handles(StringValue)
    async def react(event: StringValue, ctx: Context) -> None:
        assert not ctx.span.get_span_context().is_valid  # no span when tracing is off
        ctx.emit(Int64Value(value=1))

    bus.bind(settings.consumer_group, router.event_types())
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await publish_to(bus, router, StringValue(value="a"), headers={"traceparent": traceparent})
    loop = build_loop(
        settings,
        router,
        broker=MemoryBroker(bus, settings.consumer_group),
        state=MemoryStateStore(100, 3600, time.time),
        tracer_provider=trace.NoOpTracerProvider(),
    )
    running = RunningLoop(loop)
    await running.wait_until(lambda: bus.pending(settings.consumer_group) == 0)
    await running.stop_gracefully()

    [emitted] = bus.messages("google.protobuf.Int64Value")
    assert emitted.headers["traceparent"] == traceparent
