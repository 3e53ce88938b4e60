"""Dispatch: each key's events to their handler in order, keys concurrently, through one
retry policy and the tracing chosen at start."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from functools import partial
from typing import Any

import structlog
from opentelemetry import trace

from .brokers.base import DeadLetterRecord, InboundMessage
from .clock import Clock
from .config import Settings
from .envelope import CORRELATION_ID, Envelope
from .errors import DeadLetter
from .intake import WorkByKey
from .keystate import KeySlot, SlotsByKey
from .reaction import Outcome, Reaction, Work
from .retry import RetryPolicy
from .router import Context
from .stats import LoopStats
from .telemetry import LoopMetrics
from .tracing import Tracing


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        tracing: Tracing,
        log: structlog.typing.FilteringBoundLogger,
        stats: LoopStats,
        metrics: LoopMetrics,
        clock: Clock,
        *,
        metering: bool,
    ) -> None:
        self.settings = settings
        self.tracing = tracing
        self.log = log
        self.stats = stats
        self.metrics = metrics
        self.clock = clock
        self.metering = metering  # timings are only worth taking when they are exported
        self.retry = RetryPolicy(
            settings.retry_initial_backoff_ms / 1000,
            settings.retry_max_backoff_ms / 1000,
            settings.retry_attempts,
        )
        self.handle = tracing.around(self._handle_in_span)

    async def handle_all(self, work: WorkByKey, slots: SlotsByKey, reaction: Reaction) -> None:
        """Up to MAX_CONCURRENCY workers take whole keys from one shared list (no task per
        key or per event); the extra workers start only once the first one yields to the
        event loop, so handlers that never wait cost no tasks. An event its key's stored
        state already applied (a crash cut its checkpoint short) is not handled again."""
        groups = list(work.items())
        taken = 0
        handle = self.handle

        async def worker() -> None:
            nonlocal taken
            while taken < len(groups):  # shared: each key is taken by exactly one worker
                group, items = groups[taken]
                taken += 1
                slot = slots.get(group)
                for item in items:
                    if slot is not None and item.event_id in slot.stored.applied:
                        reaction.duplicates += 1  # its key's stored state has it already
                        continue
                    outcome = await handle(item, slot)
                    if isinstance(outcome, DeadLetterRecord):
                        reaction.dead.append(outcome)
                        continue
                    reaction.handled += 1
                    if outcome:
                        reaction.emitted += len(outcome)
                        reaction.emits.append((item, outcome))

        async def more_workers() -> None:
            extra = min(self.settings.max_concurrency - 1, len(groups) - taken)
            if extra > 0:
                await asyncio.gather(*(worker() for _ in range(extra)))

        await asyncio.gather(worker(), more_workers())

    async def _handle_in_span(
        self, item: Work, slot: KeySlot | None, span: trace.Span = trace.INVALID_SPAN
    ) -> Outcome:
        """Handle one event. The first attempt runs directly; only a failure pays for the
        retry policy, which then waits and runs attempt 2 on."""
        message = item.message
        try:
            context, state, call = self._attempt(item, span, slot, 1)
            await call
        except DeadLetter as error:
            return DeadLetterRecord(message, error.reason, error.detail)
        except Exception as first_error:
            try:
                context, state = await self._retry(item, span, slot, first_error)
            except DeadLetter as error:
                return DeadLetterRecord(message, error.reason, error.detail)
            except Exception as error:
                span.record_exception(error)
                attempts = self.settings.retry_attempts
                detail = f"{type(error).__name__}: {error} (after {attempts} attempts)"
                return DeadLetterRecord(message, "handler-failed", detail)
        emitted = context.emitted
        try:
            if emitted:  # read here, where an unreadable one is a dead letter
                item.correlation_id = _correlation_id(item.envelope)
            if slot is not None and state is not None:
                slot.finish(item.event_id, state)
        except DeadLetter as error:  # InvalidEnvelope, or an unusable ctx.state
            return DeadLetterRecord(message, error.reason, error.detail)
        if emitted:
            self.tracing.emitted(item, span, emitted)
        return emitted

    def _attempt(
        self, item: Work, span: trace.Span, slot: KeySlot | None, number: int
    ) -> tuple[Context, dict[str, Any] | None, Awaitable[None]]:
        """One run of the handler, for the caller to await (one coroutine less per event);
        a stateful handler gets a fresh copy of its key's state."""
        state = slot.begin() if slot is not None and item.spec.stateful else None
        log = partial(self.event_log, item.envelope, item.message, span, number)
        context = Context(item.envelope, number, log, span, state)
        call = item.spec.handler(item.envelope.payload, context)
        if self.metering:
            call = self._timed(call, item.envelope.type)
        return context, state, call

    async def _timed(self, call: Awaitable[None], event_type: str) -> None:
        started = self.clock.monotonic()
        try:
            await call
        finally:
            elapsed = self.clock.monotonic() - started
            self.metrics.handler_duration.record(elapsed, {"event.type": event_type})

    async def _retry(
        self, item: Work, span: trace.Span, slot: KeySlot | None, first_error: Exception
    ) -> tuple[Context, dict[str, Any] | None]:
        async def attempt(number: int) -> tuple[Context, dict[str, Any] | None]:
            context, state, call = self._attempt(item, span, slot, number)
            await call
            return context, state

        def on_retry(number: int, error: Exception, delay: float) -> None:
            self.stats.retries += 1
            self.metrics.retries.add(1)
            log = self.event_log(item.envelope, item.message, span, number)
            log.warning(
                "retrying",
                attempt=number,
                error=f"{type(error).__name__}: {error}",
                delay_s=round(delay, 3),
            )

        return await self.retry.run(attempt, first_error, _is_transient, on_retry)

    def event_log(
        self, envelope: Envelope, message: InboundMessage, span: trace.Span, attempt: int
    ) -> structlog.typing.FilteringBoundLogger:
        """A logger bound to one event; built only when a handler or a retry logs."""
        log = self.log.bind(
            event_id=envelope.id,
            event_type=envelope.type,
            event_source=envelope.source,
            subject=envelope.subject,
            stream=message.stream,
            position=message.position,
            attempt=attempt,
        )
        span_context = span.get_span_context()
        if span_context.is_valid:
            log = log.bind(
                trace_id=format(span_context.trace_id, "032x"),
                span_id=format(span_context.span_id, "016x"),
            )
        return log


def _correlation_id(envelope: Envelope) -> str:
    """The id of the chain `envelope` belongs to: its correlation id, or its own id if it
    starts one."""
    correlation_id = envelope.extension(CORRELATION_ID)
    return envelope.id if correlation_id is None else correlation_id


def _is_transient(error: Exception) -> bool:
    """Retry handler errors, but never DeadLetter (cancellation is no Exception: a stop or
    a crash is never retried)."""
    return not isinstance(error, DeadLetter)
