"""Traces follow an event across services; logs carry event and trace fields. Template-owned."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest
import structlog
from google.protobuf.wrappers_pb2 import Int64Value, StringValue
from opentelemetry import trace
from opentelemetry.context import Context as TraceContext
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    DEFAULT_OFF,
    DEFAULT_ON,
    Decision,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.span import TraceState

from {{ cookiecutter.package_name }}.runtime import Context, Router
from {{ cookiecutter.package_name }}.runtime.app import build_loop
from {{ cookiecutter.package_name }}.runtime.brokers.memory import MemoryBroker, MemoryBus
from {{ cookiecutter.package_name }}.runtime.config import Settings
from {{ cookiecutter.package_name }}.runtime.dispatch import Dispatcher
from {{ cookiecutter.package_name }}.runtime.logs import configure_logging
from {{ cookiecutter.package_name }}.runtime.spans import ConsumerSpans
from {{ cookiecutter.package_name }}.runtime.state.memory import MemoryStateStore
from {{ cookiecutter.package_name }}.runtime.telemetry import (
    _exporter_names,
    extract,
    inject,
    tracer,
    tracer_provider,
)
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


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
async def test_a_handler_debug_line_binds_no_logger_while_debug_is_off(
    level: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The sample handler logs at debug for every event: below the level that must cost
    no logger bound to the event; at debug the line is written, bound as before."""
    configure_logging(Settings(log_format="json", log_level=level))
    binds = []
    bind_event_log = Dispatcher.event_log

    def counted(self: Dispatcher, *args: Any) -> Any:
        binds.append(args)
        return bind_event_log(self, *args)

    monkeypatch.setattr(Dispatcher, "event_log", counted)
    router = Router()

    @router.handles(StringValue)
    async def chatty(event: StringValue, ctx: Context) -> None:
        ctx.log.debug("handling", value=event.value)

    service = ServiceHarness(router, **FAST)
    ids = [await service.publish(StringValue(value=str(n)), key="k") for n in range(3)]
    await service.run_until_idle()

    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    written = [line for line in lines if line["event"] == "handling"]
    if level == "INFO":
        assert (binds, written) == ([], [])
    else:
        assert [line["event_id"] for line in written] == ids
        assert len(binds) == 3


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


async def _emitted_headers(
    traceparent: str, provider: trace.TracerProvider, seen: list[SpanContext]
) -> Mapping[str, str]:
    """Handle one event carrying `traceparent` (the handler notes its span's context in
    `seen` and emits one event); the emitted event's headers."""
    bus = MemoryBus()
    settings = fast_settings()
    router = Router()

    @router.handles(StringValue)
    async def react(event: StringValue, ctx: Context) -> None:
        seen.append(ctx.span.get_span_context())
        ctx.emit(Int64Value(value=1))

    bus.bind(settings.consumer_group, router.event_types())
    await publish_to(bus, router, StringValue(value="a"), headers={"traceparent": traceparent})
    loop = build_loop(
        settings,
        router,
        broker=MemoryBroker(bus, settings.consumer_group),
        state=MemoryStateStore(100, 3600, time.time),
        tracer_provider=provider,
    )
    running = RunningLoop(loop)
    await running.wait_until(lambda: bus.pending(settings.consumer_group) == 0)
    await running.stop_gracefully()
    [emitted] = bus.messages("google.protobuf.Int64Value")
    return emitted.headers


async def test_without_tracing_the_trace_context_passes_through_unchanged() -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    seen: list[SpanContext] = []
    headers = await _emitted_headers(traceparent, trace.NoOpTracerProvider(), seen)
    assert headers["traceparent"] == traceparent
    assert not seen[0].is_valid  # no span when tracing is off


class CountingSampler(Sampler):
    """A sampler the loop cannot know the rule of: it must be asked once per span."""

    def __init__(self) -> None:
        self.asked = 0

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        self.asked += 1
        return SamplingResult(Decision.RECORD_AND_SAMPLE if self.asked % 3 else Decision.DROP)

    def get_description(self) -> str:
        return "CountingSampler"


def _parents() -> list[TraceContext]:
    """Roots, and remote or local parents sampled or not, with and without W3C's
    random-trace-id bit (0x02), a trace state, and a flag bit no SDK knows (0x04)."""
    state = TraceState([("vendor", "v1")])
    parents = [TraceContext()] * 300
    parents.append(trace.set_span_in_context(trace.INVALID_SPAN))
    for n, (remote, flags) in enumerate(
        [(True, 0x00), (True, 0x02), (True, 0x01), (True, 0x03), (False, 0x00), (True, 0x04)] * 5
    ):
        parent = SpanContext(1000 + n, 77 + n, remote, TraceFlags(flags), state)
        parents.append(trace.set_span_in_context(NonRecordingSpan(parent)))
    return parents


def _start_all(
    provider: TracerProvider,
    parents: Sequence[TraceContext],
    start: Callable[[trace.Tracer, TraceContext], trace.Span],
) -> tuple[list[tuple[SpanContext, bool]], int, list[tuple[Any, ...]]]:
    """Each span's context and whether it records, how often the SDK was asked to start a
    span, and what was exported; from a fixed random seed, so two runs draw the same ids."""
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    chosen = tracer(provider)
    sdk_start_span, sdk_calls = chosen.start_span, 0

    def counted(*args: Any, **kwargs: Any) -> trace.Span:
        nonlocal sdk_calls
        sdk_calls += 1
        return sdk_start_span(*args, **kwargs)

    chosen.start_span = counted  # type: ignore[method-assign]
    random.seed(20261122)
    started = []
    for parent in parents:
        span = start(chosen, parent)
        started.append((span.get_span_context(), span.is_recording()))
        span.end()
    exported = [(s.name, s.kind, s.context, s.parent) for s in exporter.get_finished_spans()]
    return started, sdk_calls, exported


def _via_consumer_spans(chosen: trace.Tracer, parent: TraceContext) -> trace.Span:
    return ConsumerSpans(chosen).start("t", parent)


def _via_the_sdk(chosen: trace.Tracer, parent: TraceContext) -> trace.Span:
    return chosen.start_span("process t", context=parent, kind=SpanKind.CONSUMER)


@pytest.mark.parametrize(
    "sampler",
    [
        ParentBased(TraceIdRatioBased(0.01)),
        ParentBased(TraceIdRatioBased(0.5)),
        ParentBasedTraceIdRatio(0.3),
        DEFAULT_ON,
        DEFAULT_OFF,
        ParentBased(TraceIdRatioBased(0.0)),
    ],
    ids=lambda sampler: sampler.get_description()[:40],
)
def test_consumer_spans_start_the_span_the_sdk_would_and_ask_it_only_for_sampled_ones(
    sampler: Sampler,
) -> None:
    parents = _parents()
    ours, sdk_calls, exported = _start_all(
        tracer_provider(sampler=sampler), parents, _via_consumer_spans
    )
    theirs, _, exported_by_the_sdk = _start_all(
        tracer_provider(sampler=sampler), parents, _via_the_sdk
    )
    assert ours == theirs  # same ids, flags, trace state, and sampling decisions
    assert exported == exported_by_the_sdk
    sampled = sum(recording for _, recording in ours)
    flags = [trace.get_current_span(parent).get_span_context().trace_flags for parent in parents]
    unknown_flags = sum(1 for parent_flags in flags if parent_flags & 0x04)
    assert sdk_calls == sampled + unknown_flags  # a dropped span costs no SDK call


def test_the_ratio_sampler_the_environment_asks_for_takes_the_fast_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    roots = [TraceContext()] * 400
    started, sdk_calls, exported = _start_all(tracer_provider(), roots, _via_consumer_spans)
    sampled = sum(recording for _, recording in started)
    assert 60 < sampled < 140 and sdk_calls == sampled == len(exported)


@pytest.mark.parametrize(
    "provider",
    [
        lambda: tracer_provider(sampler=ParentBased(CountingSampler())),  # a custom root
        lambda: TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.5))),  # ids not ours
    ],
    ids=["custom sampler", "other provider"],
)
def test_any_other_sampler_or_provider_starts_every_span_in_the_sdk(
    provider: Callable[[], TracerProvider],
) -> None:
    started, sdk_calls, _ = _start_all(provider(), [TraceContext()] * 30, _via_consumer_spans)
    assert sdk_calls == 30 and {recording for _, recording in started} == {True, False}


def test_with_the_sdks_internal_metrics_every_span_goes_through_the_sdk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "true")
    provider = tracer_provider(sampler=ParentBased(TraceIdRatioBased(0.01)))
    _, sdk_calls, _ = _start_all(provider, [TraceContext()] * 30, _via_consumer_spans)
    assert sdk_calls == 30


@pytest.mark.parametrize(
    "provider",
    [
        lambda: tracer_provider(sampler=DEFAULT_ON),
        lambda: tracer_provider(sampler=DEFAULT_OFF),
        lambda: TracerProvider(sampler=DEFAULT_ON),  # through the SDK
    ],
    ids=["sampled", "dropped", "other provider"],
)
def test_a_message_without_trace_context_starts_a_trace_of_its_own(
    provider: Callable[[], TracerProvider],
) -> None:
    chosen = tracer(provider())
    with TracerProvider().get_tracer("test").start_as_current_span("ambient") as ambient:
        parent = extract({"x-key": "k"}, frozenset({"traceparent"}))  # no trace headers
        span = ConsumerSpans(chosen).start("t", parent)
    assert span.get_span_context().is_valid and ambient.get_span_context().is_valid
    assert span.get_span_context().trace_id != ambient.get_span_context().trace_id


async def test_an_unsampled_trace_is_carried_on_without_spans() -> None:
    exporter = InMemorySpanExporter()
    provider = tracer_provider(sampler=ParentBased(TraceIdRatioBased(1.0)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    traceparent = f"00-{trace_id}-b7ad6b7169203331-00"  # upstream did not sample it
    seen: list[SpanContext] = []
    headers = await _emitted_headers(traceparent, provider, seen)

    [span_context] = seen
    assert format(span_context.trace_id, "032x") == trace_id
    assert not span_context.trace_flags.sampled
    span_id = format(span_context.span_id, "016x")
    assert headers["traceparent"] == f"00-{trace_id}-{span_id}-00"
    assert span_id != "b7ad6b7169203331"
    assert exporter.get_finished_spans() == ()
