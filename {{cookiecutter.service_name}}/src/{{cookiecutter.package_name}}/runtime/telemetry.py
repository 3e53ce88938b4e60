"""OpenTelemetry traces and metrics, pushed (no port), configured only by OTEL_* variables.

- OTEL_EXPORTER_OTLP_ENDPOINT (or *_TRACES_/*_METRICS_ENDPOINT) set: export over OTLP,
  gRPC by default, HTTP with OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf.
- OTEL_TRACES_EXPORTER / OTEL_METRICS_EXPORTER: `otlp`, `console` (local runs) or `none`.
- Nothing set: nothing is exported, and the API's no-op tracer keeps the cost near zero.
- Sampling: OTEL_TRACES_SAMPLER (default parentbased_always_on), e.g.
  OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.01.
Trace context travels in message headers as W3C `traceparent` (OTEL_PROPAGATORS applies).
"""

from __future__ import annotations

import os
import random
import re
import threading
from collections.abc import Mapping, MutableMapping
from functools import cache
from typing import TYPE_CHECKING

from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context as TraceContext
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    TraceFlags,
    TraceState,
)

from .. import SERVICE_NAME

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource

INSTRUMENTATION = f"{SERVICE_NAME}.runtime"
_EMPTY_CONTEXT = TraceContext()


def _exporter_names(kind: str) -> list[str]:
    names = os.environ.get(f"OTEL_{kind.upper()}_EXPORTER")
    if names is None:
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
            f"OTEL_EXPORTER_OTLP_{kind.upper()}_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    return [name.strip() for name in names.split(",") if name.strip() not in ("", "none")]


def _http() -> bool:
    return os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc").startswith("http")


def configure_telemetry() -> None:
    """Install SDK providers for the exporters the environment asks for, if any."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({"service.name": SERVICE_NAME})
    span_exporters = _exporter_names("traces")
    if span_exporters:
        _configure_traces(resource, span_exporters)
    metric_exporters = _exporter_names("metrics")
    if metric_exporters:
        _configure_metrics(resource, metric_exporters)


def _configure_traces(resource: Resource, names: list[str]) -> None:
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    provider = tracer_provider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER
    for name in names:
        if name == "console":
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        elif name == "otlp":
            if _http():
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter as HttpSpanExporter,
                )

                provider.add_span_processor(BatchSpanProcessor(HttpSpanExporter()))
            else:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                    OTLPSpanExporter as GrpcSpanExporter,
                )

                provider.add_span_processor(BatchSpanProcessor(GrpcSpanExporter()))
    trace.set_tracer_provider(provider)


def _configure_metrics(resource: Resource, names: list[str]) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        MetricExporter,
        PeriodicExportingMetricReader,
    )

    exporters: list[MetricExporter] = []
    for name in names:
        if name == "console":
            exporters.append(ConsoleMetricExporter())
        elif name == "otlp":
            if _http():
                from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                    OTLPMetricExporter as HttpMetricExporter,
                )

                exporters.append(HttpMetricExporter())
            else:
                from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                    OTLPMetricExporter as GrpcMetricExporter,
                )

                exporters.append(GrpcMetricExporter())
    readers = [PeriodicExportingMetricReader(exporter) for exporter in exporters]
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))


def shutdown_telemetry() -> None:
    """Flush what is buffered (called when the service stops)."""
    for provider in (trace.get_tracer_provider(), metrics.get_meter_provider()):
        shutdown = getattr(provider, "shutdown", None)
        if shutdown is not None:
            shutdown()


def propagation_fields() -> frozenset[str]:
    """Header names the configured propagators read (traceparent, tracestate, baggage...)."""
    return frozenset(propagate.get_global_textmap().fields)


def extract(headers: Mapping[str, str], fields: frozenset[str] | None = None) -> TraceContext:
    """The trace context a message carries in its headers (W3C traceparent, or what
    OTEL_PROPAGATORS names); empty, cheaply, when it carries none of `fields`. Never the
    consuming process's current context: a message's handling is its own."""
    names = propagation_fields() if fields is None else fields
    if names.isdisjoint(headers):
        return _EMPTY_CONTEXT
    return propagate.extract(headers)


def inject(headers: MutableMapping[str, str]) -> None:
    """Put the current trace context into outgoing message headers."""
    propagate.inject(headers)


def tracing_enabled(provider: trace.TracerProvider | None = None) -> bool:
    """False when no tracing SDK is configured: spans would all be no-ops, so the loop
    skips them (and their per-message cost) entirely."""
    chosen = provider if provider is not None else trace.get_tracer_provider()
    return not isinstance(chosen, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def metrics_enabled(provider: metrics.MeterProvider | None = None) -> bool:
    """False when no metrics SDK is configured: per-message timings would be discarded."""
    from opentelemetry.sdk.metrics import MeterProvider

    chosen = provider if provider is not None else metrics.get_meter_provider()
    return isinstance(chosen, MeterProvider)


def pass_on(
    incoming: Mapping[str, str], outgoing: MutableMapping[str, str], fields: frozenset[str]
) -> None:
    """Without tracing, copy the incoming trace context (the propagators' `fields`) to an
    emitted event, so a chain of services stays one trace across one that does not trace."""
    for name in fields:
        if name in incoming:
            outgoing[name] = incoming[name]


def tracer(provider: trace.TracerProvider | None = None) -> trace.Tracer:
    """The runtime's tracer: from `provider`, else the global one (no-op until configured)."""
    return trace.get_tracer(INSTRUMENTATION, tracer_provider=provider)


def tracer_provider(
    *, sampler: Sampler | None = None, resource: Resource | None = None
) -> TracerProvider:
    """An SDK tracer provider as the service makes it (sampler from OTEL_TRACES_SAMPLER
    unless given), with trace ids the loop can choose for the spans it samples itself."""
    return TracerProvider(sampler=sampler, resource=resource, id_generator=ChosenTraceIds())


class ChosenTraceIds(RandomIdGenerator):
    """Random ids, where a root span's ids can be drawn ahead (ConsumerSpans decides on its
    trace id whether it is sampled) and then handed to the SDK for the next span it starts
    on the same thread."""

    def __init__(self) -> None:
        self._chosen = threading.local()

    @staticmethod
    def draw_root_ids() -> tuple[int, int]:
        """A trace id and a span id: in one call, the same draw as `generate_trace_id`
        then `generate_span_id` (getrandbits fills from the low bits up)."""
        bits = random.getrandbits(192)
        trace_id, span_id = bits & _TRACE_ID_BITS, bits >> 128
        if trace_id and span_id:
            return trace_id, span_id
        return ChosenTraceIds.draw_root_ids()  # an invalid (zero) id: 2**-64 odds

    @staticmethod
    def draw_span_id() -> int:
        return random.getrandbits(64) or ChosenTraceIds.draw_span_id()

    def choose_next(self, trace_id: int, span_id: int) -> None:
        self._chosen.trace_id, self._chosen.span_id = trace_id, span_id

    def _take_chosen(self, which: str) -> int | None:
        chosen: int | None = getattr(self._chosen, which, None)
        setattr(self._chosen, which, None)
        return chosen

    def generate_trace_id(self) -> int:
        return self._take_chosen("trace_id") or super().generate_trace_id()

    def generate_span_id(self) -> int:
        return self._take_chosen("span_id") or super().generate_span_id()


_TRACE_ID_BITS = (1 << 128) - 1
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)


# What the SDK says of the sampler OTEL_TRACES_SAMPLER=parentbased_traceidratio (or
# parentbased_always_on, the default, or parentbased_always_off) builds.
_PARENT_BASED = re.compile(
    r"ParentBased\{root:(?:TraceIdRatioBased\{(?P<rate>[^{}]+)\}|(?P<static>Always(?:On|Off)Sampler)),"
    r"remoteParentSampled:AlwaysOnSampler,remoteParentNotSampled:AlwaysOffSampler,"
    r"localParentSampled:AlwaysOnSampler,localParentNotSampled:AlwaysOffSampler\}"
)


def _root_bound(sampler: object) -> int | None:
    """For the SDK's parent-based samplers with their default delegates: a root span is
    sampled when its trace id's low 64 bits are below this bound. None for any other."""
    if not isinstance(sampler, Sampler) or type(sampler) not in (
        ParentBased,
        ParentBasedTraceIdRatio,
    ):
        return None
    description = sampler.get_description()
    match = _PARENT_BASED.fullmatch(description)
    if match is None:
        return None
    if match["static"] is not None:
        return TraceIdRatioBased.TRACE_ID_LIMIT + 1 if "On" in match["static"] else 0
    try:
        rate = float(match["rate"])
    except ValueError:
        return None
    as_built: Sampler = ParentBased(TraceIdRatioBased(rate))
    if as_built.get_description() != description:  # the rate read back exactly
        return None
    return TraceIdRatioBased.get_bound_for_rate(rate)


@cache
def _dropped_span_flags() -> tuple[TraceFlags, dict[int, TraceFlags]]:
    """The trace flags the installed SDK gives a span its sampler drops: a root's, and a
    child's by its parent's flags (SDK versions differ on the random-trace-id bit)."""
    probe = TracerProvider(sampler=ParentBased(ALWAYS_OFF), shutdown_on_exit=False)
    tracer = probe.get_tracer(__name__)
    root = tracer.start_span("probe").get_span_context().trace_flags
    children = {}
    for flags in (0x00, 0x02):  # not sampled, with and without W3C's random-trace-id bit
        parent = NonRecordingSpan(SpanContext(1, 1, True, TraceFlags(flags)))
        child = tracer.start_span("probe", context=trace.set_span_in_context(parent))
        children[flags] = child.get_span_context().trace_flags
    return root, children


class _DroppedSpan(NonRecordingSpan):
    """A span the sampler dropped. Its SpanContext is made when first asked for: a handler
    that neither emits, logs nor starts spans never asks."""

    def __init__(  # NonRecordingSpan's only state, its context, is made when asked for
        self, trace_id: int, span_id: int, flags: TraceFlags, state: TraceState | None = None
    ) -> None:
        self._parts = trace_id, span_id, flags, state
        self._made = False

    def get_span_context(self) -> SpanContext:
        if not self._made:
            trace_id, span_id, flags, state = self._parts
            self._context, self._made = SpanContext(trace_id, span_id, False, flags, state), True
        return self._context

    def __repr__(self) -> str:
        return f"NonRecordingSpan({self.get_span_context()!r})"


class ConsumerSpans:
    """Starts each message's consumer span, with the same result as the tracer's
    `start_span` (ids, flags, trace state, sampled or not), and cheaper.

    With the SDK's parent-based samplers (OTEL_TRACES_SAMPLER=parentbased_traceidratio,
    parentbased_always_on or _off) and a provider from `tracer_provider`, a span the
    sampler drops is built here: the non-recording span that carries the trace on. The
    SDK's start_span costs 2.9 us for it, this 0.5 us; at 1 % sampling that was most
    of what tracing added to the loop. Sampled spans, and all spans under any other sampler
    or with the SDK's internal metrics on (they count every span), come from the SDK."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer
        ids = getattr(tracer, "id_generator", None)
        internal_metrics = os.environ.get("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "")
        ours = type(ids) is ChosenTraceIds and internal_metrics.strip().lower() != "true"
        self._root_bound = _root_bound(getattr(tracer, "sampler", None)) if ours else None
        self._ids = ids if isinstance(ids, ChosenTraceIds) else ChosenTraceIds()
        self._root_flags, self._child_flags = (
            _dropped_span_flags() if self._root_bound is not None else (_NOT_SAMPLED, {})
        )

    def start(self, destination: str, parent: TraceContext) -> trace.Span:
        """The CONSUMER span "process `destination`", child of the span in `parent` (what
        the message carries); the root of a new trace when `parent` is empty."""
        bound = self._root_bound
        if bound is not None:
            parent_span = trace.get_current_span(parent).get_span_context() if parent else None
            if parent_span is None or not parent_span.is_valid:
                trace_id, span_id = self._ids.draw_root_ids()
                if trace_id & TraceIdRatioBased.TRACE_ID_LIMIT >= bound:
                    return _DroppedSpan(trace_id, span_id, self._root_flags)
                self._ids.choose_next(trace_id, span_id)  # sampled: the SDK makes it
            elif not parent_span.trace_flags.sampled:
                flags = self._child_flags.get(parent_span.trace_flags)
                if flags is not None:
                    trace_id, state = parent_span.trace_id, parent_span.trace_state
                    return _DroppedSpan(trace_id, self._ids.draw_span_id(), flags, state)
        name = f"process {destination}"
        return self._tracer.start_span(name, context=parent, kind=SpanKind.CONSUMER)


class LoopMetrics:
    """The loop's instruments; no-ops until a meter provider is configured."""

    def __init__(self, provider: metrics.MeterProvider | None = None) -> None:
        meter = metrics.get_meter(INSTRUMENTATION, meter_provider=provider)
        # Latest consumer lag per stream, observed whenever the metrics are exported.
        self.lag: dict[str, int] = {}
        meter.create_observable_gauge(
            "events.consumer.lag",
            callbacks=[self._observe_lag],
            unit="{message}",
            description="Messages waiting per stream (partition or queue), as the bus reports",
        )
        self.handled = meter.create_counter("events.handled", description="Events handled")
        self.duplicates = meter.create_counter(
            "events.duplicates", description="Duplicates dropped"
        )
        self.retries = meter.create_counter("events.retries", description="Handler retries")
        self.dead_lettered = meter.create_counter(
            "events.dead_lettered", description="Events parked, by reason"
        )
        self.emitted = meter.create_counter("events.emitted", description="Events emitted")
        self.handler_duration = meter.create_histogram(
            "handler.duration", unit="s", description="Handler run time, per attempt"
        )
        self.batch_size = meter.create_histogram("batch.size", description="Messages per batch")
        self.checkpoint_duration = meter.create_histogram(
            "checkpoint.duration", unit="s", description="Time to record a batch in the store"
        )
        self.checkpoint_failures = meter.create_counter(
            "checkpoint.failures", description="Store or bus writes that failed and were retried"
        )

    def _observe_lag(self, _options: metrics.CallbackOptions) -> list[metrics.Observation]:
        return [
            metrics.Observation(count, {"stream": stream}) for stream, count in self.lag.items()
        ]
