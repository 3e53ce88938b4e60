"""The consumer span of each message, as the tracer's `start_span` would make it, and
cheaper when the sampler drops it (docs/performance.md has the figures).

With the SDK's parent-based samplers (OTEL_TRACES_SAMPLER=parentbased_traceidratio, or
parentbased_always_on / _off) and a provider whose id generator is `ChosenTraceIds`
(`telemetry.tracer_provider`, as the service configures it), `ConsumerSpans` makes the
sampler's decision itself, as those samplers do, and builds a dropped span without the
SDK: the same ids, flags and trace state. Spans the sampler keeps are started by the SDK
on the trace id the decision was made on; any other sampler, or the SDK's internal
metrics on, sends every span through the SDK. tests/runtime/test_telemetry.py starts the
same spans both ways from one random seed and compares them.
"""

from __future__ import annotations

import os
import random
import re
import threading
from functools import cache

from opentelemetry import trace
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
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, TraceState


class ChosenTraceIds(RandomIdGenerator):
    """Random ids, where a root span's ids can be drawn ahead (ConsumerSpans decides on its
    trace id whether it is sampled) and then handed to the SDK for the next span it starts
    on the same thread."""

    def __init__(self) -> None:
        self._chosen = threading.local()

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


_getrandbits = random.getrandbits
_TRACE_ID_BITS = (1 << 128) - 1
_SPAN_ID_UNIT = 1 << 128  # a root's span id, drawn with its trace id, sits above it
_SAMPLED_BITS = TraceIdRatioBased.TRACE_ID_LIMIT  # the part of a trace id samplers read


def _draw_root_ids() -> int:
    """A trace id (the low 128 bits) and a span id (the 64 above) in one number: the same
    draw as `generate_trace_id` then `generate_span_id` (getrandbits fills from the low
    bits up). Kept as one number until the ids are asked for (`_split_root_ids`)."""
    ids = _getrandbits(192)
    if ids & _TRACE_ID_BITS and ids >= _SPAN_ID_UNIT:
        return ids
    return _draw_root_ids()  # an invalid (zero) id: 2**-64 odds


def _split_root_ids(ids: int) -> tuple[int, int]:
    """(trace id, span id) of a `_draw_root_ids` number."""
    return ids & _TRACE_ID_BITS, ids >> 128


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
    that neither emits, logs nor starts spans never asks. A root's ids are kept as drawn,
    in one number (`span_id` None)."""

    def __init__(  # NonRecordingSpan's only state, its context, is made when asked for
        self,
        trace_id: int,
        span_id: int | None,
        flags: TraceFlags,
        state: TraceState | None = None,
    ) -> None:
        self._parts = trace_id, span_id, flags, state
        self._made = False

    def get_span_context(self) -> SpanContext:
        if not self._made:
            trace_id, span_id, flags, state = self._parts
            if span_id is None:
                trace_id, span_id = _split_root_ids(trace_id)
            self._context, self._made = SpanContext(trace_id, span_id, False, flags, state), True
        return self._context

    def __repr__(self) -> str:
        return f"NonRecordingSpan({self.get_span_context()!r})"


class ConsumerSpans:
    """Starts each message's consumer span, with the same result as the tracer's
    `start_span` (ids, flags, trace state, sampled or not); see the module's docstring.
    The SDK's internal metrics count every span, so with them on all go through it."""

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
                ids = _draw_root_ids()
                if ids & _SAMPLED_BITS >= bound:
                    return _DroppedSpan(ids, None, self._root_flags)
                self._ids.choose_next(*_split_root_ids(ids))  # sampled: the SDK makes it
            elif not parent_span.trace_flags.sampled:
                flags = self._child_flags.get(parent_span.trace_flags)
                if flags is not None:
                    trace_id, state = parent_span.trace_id, parent_span.trace_state
                    return _DroppedSpan(trace_id, self._ids.draw_span_id(), flags, state)
        name = f"process {destination}"
        return self._tracer.start_span(name, context=parent, kind=SpanKind.CONSUMER)
