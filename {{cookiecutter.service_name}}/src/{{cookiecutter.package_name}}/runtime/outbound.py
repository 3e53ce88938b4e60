"""Outbound: a reaction's emitted events and dead letters as messages for the bus, and
their publishing, where a message the bus can never take must not stall the loop."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from datetime import datetime
from functools import partial

import structlog

from .brokers.base import (
    DLQ_TRUNCATED,
    Broker,
    DeadLetterRecord,
    InboundMessage,
    OutboundMessage,
    PublishLimits,
    Unpublishable,
    dead_letter_message,
    event_message,
)
from .claimcheck import ClaimCheck
from .config import Settings
from .envelope import Envelope, EnvelopeCodec, derive_event_id, event_type_of, now
from .reaction import Reaction
from .retry import Outages
from .router import Emitted
from .stats import LoopStats
from .telemetry import LoopMetrics


class Outbound:
    def __init__(
        self,
        settings: Settings,
        codec: EnvelopeCodec,
        broker: Broker,
        log: structlog.typing.FilteringBoundLogger,
        stats: LoopStats,
        metrics: LoopMetrics,
    ) -> None:
        self.settings = settings
        self.codec = codec
        self.broker = broker
        self.log = log
        self.stats = stats
        self.metrics = metrics
        self.claim_check: ClaimCheck | None = None  # large payloads to object storage

    def collect(self, reaction: Reaction) -> None:
        """The reaction's emitted events, then its dead letters, as messages."""
        outbound, emitted_at = reaction.outbound, now()  # one time for the whole batch
        for item, emitted in reaction.emits:
            outbound.extend(
                self._event(item.envelope, event, item.message, emitted_at) for event in emitted
            )
        reaction.emits = []
        outbound.extend(self._dead_letter(record) for record in reaction.dead)

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

    def _dead_letter(self, record: DeadLetterRecord) -> OutboundMessage:
        destination = self.broker.dead_letter_destination(record.message.topic)
        return dead_letter_message(record, destination, self.settings.consumer_group)

    async def publish(self, reaction: Reaction, outages: Outages) -> None:
        """Publish and wait for the bus to confirm, while it is unavailable too. A message
        the bus can never take is not retried: it is replaced (`_replace_refused`) and the
        rest published again."""
        if self.claim_check is not None:
            reaction.outbound = await self.claim_check.check_out(reaction.outbound, outages)
        while True:
            try:
                publish = partial(self.broker.publish, reaction.outbound)
                reaction.unrouted = await outages.until_done("publish", publish)
                return
            except Unpublishable as refused:
                reaction.outbound = self._replace_refused(reaction, refused.refused)

    def _replace_refused(
        self, reaction: Reaction, refused: Mapping[int, str]
    ) -> list[OutboundMessage]:
        """What to publish instead of the messages the bus refused for good. A dead letter
        is cut to fit (smaller again if the bus still refuses it). An emitted event
        dead-letters the event it was emitted for, whose other emitted events are dropped
        (the handler's other effects, its key state included, stand)."""
        outbound = reaction.outbound
        limits = self.broker.limits or PublishLimits(self.settings.max_message_bytes)
        cut: dict[int, OutboundMessage | None] = {}
        sources: dict[int, InboundMessage] = {}  # by id(): events whose emits are refused
        parked = []
        for index, why in refused.items():
            message, source = outbound[index], outbound[index].origin
            if message.dead_letter:
                cut[index] = _cut_to_fit(message, limits)
                self._log_cut(message, cut[index], why)
                continue
            assert source is not None, "the loop's events carry the event they answer"
            if id(source) not in sources:
                sources[id(source)] = source
                why = f"event for {message.topic}: {why}"
                record = DeadLetterRecord(source, "emit-unpublishable", why)
                reaction.dead.append(record)
                reaction.handled -= 1
                parked.append(self._dead_letter(record))
        kept = []
        for index, message in enumerate(outbound):
            if index in cut:
                if (replacement := cut[index]) is not None:
                    kept.append(replacement)
            elif message.dead_letter or id(message.origin) not in sources:
                kept.append(message)
            else:
                reaction.emitted -= 1  # emitted for an event now dead-lettered
        return kept + parked

    def _log_cut(self, message: OutboundMessage, cut: OutboundMessage | None, why: str) -> None:
        origin = message.origin
        where = origin and f"{origin.topic}|{origin.stream}|{origin.position}"
        if cut is None:
            self.log.error(
                "dead letter dropped: the bus refuses even its headers", why=why, origin=where
            )
        else:
            self.log.warning(
                "dead letter cut to fit the bus", why=why, origin=where, size=len(message.body)
            )

    def report(self, reaction: Reaction) -> None:
        """Once acked: what was parked, counted and logged (unrouted events once per group)."""
        if unrouted := reaction.unrouted:
            self.stats.unrouted += len(unrouted)
            self.metrics.unrouted.add(len(unrouted))
            self.log.warning(
                "emitted events no consumer is bound for; parked",
                parked_in=self.broker.unrouted_destination,
                topics=dict(Counter(message.topic for message in unrouted)),
            )
        for record in reaction.dead:
            self.stats.dead_lettered[record.reason] += 1
            self.metrics.dead_lettered.add(1, {"reason": record.reason})
            self.log.warning(
                "dead-lettered",
                reason=record.reason,
                error=record.error,
                stream=record.message.stream,
                position=record.message.position,
            )


def _cut_to_fit(dead_letter: OutboundMessage, limits: PublishLimits) -> OutboundMessage | None:
    """A refused dead letter cut to `limits`; one cut before and refused again (a bus
    taking less than it says) loses half its body each time, then is given up."""
    if DLQ_TRUNCATED not in dead_letter.headers:
        return limits.fit(dead_letter)
    if dead_letter.body:
        return limits.fit(dead_letter, body=len(dead_letter.body) // 2)
    return None
