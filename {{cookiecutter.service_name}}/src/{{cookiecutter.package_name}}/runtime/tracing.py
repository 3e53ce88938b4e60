"""How each event's handling is traced, chosen once when the loop starts: no spans without
a tracing SDK, or an OpenTelemetry consumer span per event (see docs/performance.md for
why the span is started by hand)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from . import telemetry
from .brokers.base import Broker, DeadLetterRecord, InboundMessage
from .config import Settings
from .envelope import Envelope, derive_event_id, event_type_of
from .keystate import KeySlot
from .reaction import Outcome, Work
from .router import Emitted
from .spans import ConsumerSpans


class HandleInSpan(Protocol):
    def __call__(
        self, item: Work, slot: KeySlot | None, span: trace.Span = ...
    ) -> Awaitable[Outcome]: ...


Handle = Callable[[Work, KeySlot | None], Awaitable[Outcome]]


class Tracing(ABC):
    @abstractmethod
    def around(self, handle: HandleInSpan) -> Handle:
        """`handle` as the worker calls it: in a span of its own, or in none."""

    @abstractmethod
    def emitted(self, item: Work, span: trace.Span, events: Sequence[Emitted]) -> None:
        """A handled event's emitted events: the trace context they carry on."""


class NoTracing(Tracing):
    """No tracing SDK: no spans; the incoming trace context is passed on as it came."""

    def __init__(self) -> None:
        self.fields = telemetry.propagation_fields()

    def around(self, handle: HandleInSpan) -> Handle:
        return handle  # its span stays trace.INVALID_SPAN

    def emitted(self, item: Work, span: trace.Span, events: Sequence[Emitted]) -> None:
        for event in events:
            telemetry.pass_on(item.message.headers, event.headers, self.fields)


class OpenTelemetryTracing(Tracing):
    """A CONSUMER span per event, child of the trace its message carries, and a PRODUCER
    span per emitted event, whose context travels in the event's headers."""

    def __init__(self, tracer: trace.Tracer, broker: Broker, settings: Settings) -> None:
        self.tracer = tracer
        self.spans = ConsumerSpans(tracer)
        self.fields = telemetry.propagation_fields()
        self.broker = broker
        self.settings = settings

    def around(self, handle: HandleInSpan) -> Handle:
        async def traced(item: Work, slot: KeySlot | None) -> Outcome:
            # Started and made current by hand: as `start_as_current_span` does, cheaper.
            message = item.message
            parent = telemetry.extract(message.headers, self.fields)
            span = self.spans.start(message.topic, parent)
            token = otel_context.attach(trace.set_span_in_context(span, parent))
            recording = span.is_recording()  # False when not sampled
            try:
                if recording:
                    span.set_attributes(self._attributes(message, item.envelope))
                outcome = await handle(item, slot, span)
                if isinstance(outcome, DeadLetterRecord):
                    span.set_status(Status(StatusCode.ERROR, outcome.reason))
                return outcome
            except BaseException as error:
                if recording:
                    span.record_exception(error)
                    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
                raise
            finally:
                otel_context.detach(token)
                span.end()

        return traced

    def emitted(self, item: Work, span: trace.Span, events: Sequence[Emitted]) -> None:
        if not span.is_recording():
            for event in events:  # pass the (unsampled) trace on, without more spans
                telemetry.inject(event.headers)
            return
        parent_id = item.envelope.id
        for event in events:
            topic = self.settings.topic_for(event_type_of(event.message))
            with self.tracer.start_as_current_span(
                f"send {topic}",
                kind=SpanKind.PRODUCER,
                attributes={
                    "messaging.system": self.broker.messaging_system,
                    "messaging.operation.type": "send",
                    "messaging.operation.name": "send",
                    "messaging.destination.name": topic,
                    "messaging.message.id": derive_event_id(parent_id, event.position),
                },
            ):
                telemetry.inject(event.headers)

    def _attributes(self, message: InboundMessage, envelope: Envelope) -> dict[str, Any]:
        """OpenTelemetry messaging and CloudEvents semantic conventions."""
        attributes: dict[str, Any] = {
            "messaging.system": self.broker.messaging_system,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": message.topic,
            "messaging.consumer.group.name": self.settings.consumer_group,
            "messaging.message.id": envelope.id,
            "cloudevents.event_id": envelope.id,
            "cloudevents.event_source": envelope.source,
            "cloudevents.event_type": envelope.type,
        }
        if envelope.subject:
            attributes["cloudevents.event_subject"] = envelope.subject
        attributes.update(self.broker.span_attributes(message))
        return attributes


def tracing_for(
    provider: trace.TracerProvider | None, broker: Broker, settings: Settings
) -> Tracing:
    if telemetry.tracing_enabled(provider):
        return OpenTelemetryTracing(telemetry.tracer(provider), broker, settings)
    return NoTracing()
