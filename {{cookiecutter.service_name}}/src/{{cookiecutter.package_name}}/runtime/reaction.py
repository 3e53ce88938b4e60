"""What reacting to a batch produces, before anything of it is durable: a `Reaction`.

Group commit joins the reactions of several batches into one and writes it as one
`Checkpoint` per stream."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .brokers.base import DeadLetterRecord, InboundMessage, OutboundMessage
from .envelope import Envelope
from .router import Emitted, HandlerSpec
from .state.base import Checkpoint, Fence, KeyState

NO_STATES: Mapping[str, KeyState] = {}


@dataclass(slots=True)
class Work:
    """One event to handle: its delivery, its decoded envelope, its handler."""

    message: InboundMessage
    envelope: Envelope
    spec: HandlerSpec
    event_id: str  # what dedupe and key state know it by (its id, unless redriven)
    correlation_id: str | None = None  # what the events it emits carry on (read if it emits)


# What handling one event came to: the events it emitted, or a dead letter.
Outcome = Sequence[Emitted] | DeadLetterRecord


@dataclass(slots=True)
class Reaction:
    """What one batch (or, joined, a group of batches) produced."""

    fences: dict[str, Fence | None] = field(default_factory=dict)  # per stream, when handled
    recorded_at: float = 0.0  # when the batch's ids count as handled
    processed: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # ids
    digests: dict[str, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    progress: dict[str, int] = field(default_factory=dict)
    states: dict[str, dict[str, KeyState]] = field(default_factory=lambda: defaultdict(dict))
    emits: list[tuple[Work, Sequence[Emitted]]] = field(default_factory=list)  # as handled
    dead: list[DeadLetterRecord] = field(default_factory=list)
    outbound: list[OutboundMessage] = field(default_factory=list)  # emits and dead, as sent
    unrouted: Sequence[OutboundMessage] = ()  # emitted events the bus parked as unroutable
    handled: int = 0
    emitted: int = 0
    duplicates: int = 0
    last_batch: int = 0  # the number of the last batch it holds (Streams counts them)

    def joins(self, later: Reaction) -> bool:
        """Whether `later` may be written together with this reaction: a stream handled
        under another fence (taken over in between) must be written apart, in order."""
        fences = self.fences
        return all(fences.get(stream, fence) == fence for stream, fence in later.fences.items())

    def absorb(self, later: Reaction) -> None:
        """Add what `later` (handled after this one) must make durable. Digests are not
        kept: the dedupe window remembered them before `later` joined."""
        self.outbound += later.outbound
        self.dead += later.dead
        for stream, ids in later.processed.items():
            self.processed[stream] += ids
        self.recorded_at = max(self.recorded_at, later.recorded_at)
        self.last_batch = max(self.last_batch, later.last_batch)
        self.fences.update(later.fences)
        self.handled += later.handled
        self.emitted += later.emitted
        self.duplicates += later.duplicates
        for stream, states in later.states.items():
            merged = self.states[stream]
            for key, new in states.items():
                old = merged.get(key)
                merged[key] = (
                    new
                    if old is None
                    else KeyState(new.value, old.applied + new.applied, old.version)
                )
        for stream, progress in later.progress.items():
            self.progress[stream] = max(progress, self.progress.get(stream, progress))

    def checkpoints(self) -> list[Checkpoint]:
        """One per stream: ids, progress and changed key state together."""
        streams = self.processed.keys() | self.states.keys() | self.progress.keys()
        return [
            Checkpoint(
                stream,
                self.processed.get(stream, ()),
                self.recorded_at,
                self.fences[stream],
                self.progress.get(stream),
                self.states.get(stream, NO_STATES),
            )
            for stream in streams
        ]
