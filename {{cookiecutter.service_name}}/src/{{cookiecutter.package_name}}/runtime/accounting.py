"""Accounting: the last stage. A group is durable and acked: count what it did, and log
what it parked (unrouted events once per group, each dead letter)."""

from __future__ import annotations

from collections import Counter

import structlog

from .reaction import Reaction
from .stats import LoopStats
from .telemetry import LoopMetrics


class Accounting:
    def __init__(
        self,
        stats: LoopStats,
        metrics: LoopMetrics,
        log: structlog.typing.FilteringBoundLogger,
        unrouted_destination: str | None,
    ) -> None:
        self.stats = stats
        self.metrics = metrics
        self.log = log
        self.unrouted_destination = unrouted_destination

    def acked(self, acked: int, reaction: Reaction) -> None:
        stats, metrics = self.stats, self.metrics
        stats.acked += acked
        stats.handled += reaction.handled
        stats.emitted += reaction.emitted
        stats.duplicates += reaction.duplicates
        metrics.handled.add(reaction.handled)
        metrics.emitted.add(reaction.emitted)
        metrics.duplicates.add(reaction.duplicates)
        if unrouted := reaction.unrouted:
            stats.unrouted += len(unrouted)
            metrics.unrouted.add(len(unrouted))
            self.log.warning(
                "emitted events no consumer is bound for; parked",
                parked_in=self.unrouted_destination,
                topics=dict(Counter(message.topic for message in unrouted)),
            )
        for record in reaction.dead:
            stats.dead_lettered[record.reason] += 1
            metrics.dead_lettered.add(1, {"reason": record.reason})
            self.log.warning(
                "dead-lettered",
                reason=record.reason,
                error=record.error,
                stream=record.message.stream,
                position=record.message.position,
            )
