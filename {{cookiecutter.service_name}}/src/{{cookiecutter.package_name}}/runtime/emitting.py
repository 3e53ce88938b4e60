"""Emitting: a reaction's emitted events and dead letters as messages for the bus (the
last step of reacting; group commit publishes them: publishing.py)."""

from __future__ import annotations

from datetime import datetime

from .brokers.base import Broker, OutboundMessage, event_message
from .config import Settings
from .envelope import (
    CAUSATION_ID,
    CORRELATION_ID,
    Envelope,
    EnvelopeCodec,
    derive_event_id,
    event_type_of,
    now,
)
from .reaction import Reaction, Work
from .router import Emitted


class Emitter:
    def __init__(self, settings: Settings, codec: EnvelopeCodec, broker: Broker) -> None:
        self.settings = settings
        self.codec = codec
        self.broker = broker

    def collect(self, reaction: Reaction) -> None:
        """The reaction's emitted events, then its dead letters, as messages."""
        outbound, emitted_at = reaction.outbound, now()  # one time for the whole batch
        for item, emitted in reaction.emits:
            outbound.extend(self._event(item, event, emitted_at) for event in emitted)
        reaction.emits = []
        group = self.settings.consumer_group
        outbound.extend(self.broker.dead_letter(record, group) for record in reaction.dead)

    def _event(self, parent: Work, emitted: Emitted, emitted_at: datetime) -> OutboundMessage:
        event_type = event_type_of(emitted.message)
        parent_id, correlation_id = parent.envelope.id, parent.correlation_id
        assert correlation_id is not None, "dispatch reads it for every event that emits"
        envelope = Envelope(
            id=derive_event_id(parent_id, emitted.position),
            type=event_type,
            source=self.settings.event_source,
            payload=emitted.message,
            subject=emitted.key,
            time=emitted_at,
            extensions={CAUSATION_ID: parent_id, CORRELATION_ID: correlation_id},
        )
        topic = self.settings.topic_for(event_type)
        return event_message(self.codec, envelope, topic, emitted.headers, parent.message)
