"""Publishing: group commit's first step. A group's messages go to the bus, which
confirms them; a message the bus can never take must not stall the loop."""

from __future__ import annotations

from collections.abc import Mapping
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
)
from .claimcheck import ClaimCheck
from .config import Settings
from .reaction import Reaction
from .retry import Outages


class Publisher:
    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        log: structlog.typing.FilteringBoundLogger,
        claim_check: ClaimCheck | None = None,
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.log = log
        self.claim_check = claim_check  # large payloads to object storage

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
                parked.append(self.broker.dead_letter(record, self.settings.consumer_group))
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


def _cut_to_fit(dead_letter: OutboundMessage, limits: PublishLimits) -> OutboundMessage | None:
    """A refused dead letter cut to `limits`; one cut before and refused again (a bus
    taking less than it says) loses half its body each time, then is given up."""
    if DLQ_TRUNCATED not in dead_letter.headers:
        return limits.fit(dead_letter)
    if dead_letter.body:
        return limits.fit(dead_letter, body=len(dead_letter.body) // 2)
    return None
