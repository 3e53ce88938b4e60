"""Emitting: a reaction's emitted events and dead letters as messages for the bus (the
last step of reacting; group commit publishes them: publishing.py)."""

from __future__ import annotations

from datetime import datetime

from .brokers.base import Broker, InboundMessage, OutboundMessage, event_message
from .config import Settings
from .envelope import Envelope, EnvelopeCodec, derive_event_id, event_type_of, now
from .reaction import Reaction
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
            outbound.extend(
                self._event(item.envelope, event, item.message, emitted_at) for event in emitted
            )
        reaction.emits = []
        group = self.settings.consumer_group
        outbound.extend(self.broker.dead_letter(record, group) for record in reaction.dead)

    def _event(
        self, parent: Envelope, emitted: Emitted, origin: InboundMessage, emitted_at: datetime
    ) -> OutboundMessage:
        event_type = event_type_of(emitted.message)
        envelope = Envelope(
            id=derive_event_id(parent.id, emitted.position),
            type=event_type,
            source=self.settings.event_source,
            payload=emitted.message,
            subject=emitted.key,
            time=emitted_at,
            extensions={
                "causationid": parent.id,
                "correlationid": parent.extensions.get("correlationid", parent.id),
            },
        )
        topic = self.settings.topic_for(event_type)
        return event_message(self.codec, envelope, topic, emitted.headers, origin)
