"""Handler registration (`Router`) and what a handler gets besides its event (`Context`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import structlog
from google.protobuf.message import Message
from opentelemetry import trace

from .envelope import Envelope, event_type_of
from .errors import DeadLetter, RetryLater
from .logs import EventLogger

M = TypeVar("M", bound=Message)
Handler = Callable[[M, "Context"], Awaitable[None]]
Logger = structlog.typing.FilteringBoundLogger


@dataclass(frozen=True, slots=True)
class Emitted:
    """An event a handler asked to emit; published only after the handler succeeded."""

    message: Message
    key: str
    position: int
    # Trace context of its producer span, set by the loop before publishing.
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    event_type: str
    message_type: type[Message]
    handler: Handler[Any]
    stateful: bool = False

    @property
    def name(self) -> str:
        return getattr(self.handler, "__qualname__", repr(self.handler))


class Context:
    """Per-event helpers: metadata, a bound logger, the current span, emit, per-key state,
    and the steering exceptions."""

    RetryLater = RetryLater
    DeadLetter = DeadLetter

    def __init__(
        self,
        envelope: Envelope,
        attempt: int,
        log: Logger | Callable[[], Logger],
        span: trace.Span | None = None,
        state: dict[str, Any] | None = None,
    ):
        self.envelope = envelope
        self.attempt = attempt
        self._log = log
        self.span = span if span is not None else trace.INVALID_SPAN  # the consumer span
        self._emitted: list[Emitted] = []
        self._state = state

    @property
    def state(self) -> dict[str, Any]:
        """State of this event's key (its subject, else the broker key), JSON values.

        Changes are committed in the same store write as the event's checkpoint, and only
        if the handler succeeds; each retry starts from the state before this event.
        Needs ``@router.handles(EventType, stateful=True)``.
        """
        if self._state is None:
            raise RuntimeError(
                f"ctx.state: register the handler of {self.envelope.type} with "
                "@router.handles(..., stateful=True)"
            )
        return self._state

    @property
    def log(self) -> Logger:
        """A logger bound to this event (ids, type, source, subject, position, attempt,
        trace); bound on its first line at a level that is written, so handlers that do
        not log, or log below the level, do not pay for it."""
        if callable(self._log):
            self._log = cast(Logger, EventLogger(self._log))
        return self._log

    @property
    def event_id(self) -> str:
        return self.envelope.id

    def emit(self, message: Message, *, key: str | None = None) -> None:
        """Queue a follow-up event. Its id derives from this event's id and the position.

        `key` orders events (Kafka partition key, RabbitMQ subject); it defaults to this
        event's subject so a chain of reactions keeps one key.
        """
        self._emitted.append(
            Emitted(message, key if key is not None else self.envelope.subject, len(self._emitted))
        )

    @property
    def emitted(self) -> Sequence[Emitted]:
        """The events emitted so far, in order (read-only: `emit` adds to them)."""
        return self._emitted


class Router:
    """Collects one async handler per event type: ``@router.handles(OrderPlaced)``."""

    def __init__(self) -> None:
        self._specs: dict[str, HandlerSpec] = {}
        # The handler of an event type, or None: asked once per event, so the dict's own method.
        self.get: Callable[[str], HandlerSpec | None] = self._specs.get

    def handles(
        self, message_type: type[M], *, stateful: bool = False
    ) -> Callable[[Handler[M]], Handler[M]]:
        """Register a handler; `stateful=True` gives it `ctx.state` (loaded per key before
        the handler runs, so only handlers that use it pay for the read)."""
        event_type = event_type_of(message_type)

        def register(handler: Handler[M]) -> Handler[M]:
            if event_type in self._specs:
                existing = self._specs[event_type].name
                raise ValueError(f"{event_type} already handled by {existing}")
            self._specs[event_type] = HandlerSpec(event_type, message_type, handler, stateful)
            return handler

        return register

    def has_stateful(self) -> bool:
        """Whether any handler keeps per-key state (only then are key states loaded)."""
        return any(spec.stateful for spec in self._specs.values())

    def event_types(self) -> list[str]:
        return sorted(self._specs)

    def message_types(self) -> list[type[Message]]:
        return [spec.message_type for spec in self._specs.values()]
