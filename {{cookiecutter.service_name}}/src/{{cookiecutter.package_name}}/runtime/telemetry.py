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
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING

from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context as TraceContext
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import Sampler

from .. import SERVICE_NAME
from .spans import ChosenTraceIds

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
        self.unrouted = meter.create_counter(
            "events.unrouted",
            description="Emitted events no consumer was bound for, parked by the bus",
        )
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
