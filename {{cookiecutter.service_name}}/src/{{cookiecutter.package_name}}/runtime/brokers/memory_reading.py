"""Operator reads on the memory bus: it keeps every message published (`published`), so
it reads like Kafka: history by time, dead letters re-read, a redrive's progress kept."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime

from ..config import Settings
from .base import OutboundMessage
from .memory import MemoryBroker, delivery
from .reading import BusReader, Reading, Record, Start

POLL_S = 0.01  # a follow waits this long between looks at the bus


class MemoryReader(BusReader):
    broker: MemoryBroker

    def __init__(self, settings: Settings, broker: MemoryBroker) -> None:
        super().__init__(settings, broker)
        self._resume: str | None = None

    async def read(
        self, event_types: Sequence[str], start: Start, until: datetime | None, *, follow: bool
    ) -> Reading:
        topics = {self.settings.topic_for(event_type) for event_type in event_types}
        bus = self.broker.bus
        first = self._index(start)
        end = None if follow else len(bus.published)
        total = None if end is None else sum(m.topic in topics for m in bus.published[first:end])
        return Reading(
            self._records(first, end, lambda message: message.topic in topics, until), total
        )

    async def parked(
        self, event_types: Sequence[str], resume: str | None = None, bound: int | None = None
    ) -> Reading:
        self._resume = resume
        topics = {
            self.settings.dead_letter_topic_for(self.settings.topic_for(event_type))
            for event_type in event_types
        }
        bus = self.broker.bus

        def parked(message: OutboundMessage) -> bool:
            return message.dead_letter and message.topic in topics

        first = 0 if resume is None else bus.redrive_progress.get(resume, 0)
        end = len(bus.published)
        total = sum(parked(message) for message in bus.published[first:end])
        return Reading(self._records(first, end, parked, None), total)

    async def settle(self, read: Sequence[Record], redriven: Sequence[Record]) -> None:
        if self._resume is not None and read:
            self.broker.bus.redrive_progress[self._resume] = read[-1].message.position + 1

    def _index(self, start: Start) -> int:
        published_at = self.broker.bus.published_at
        if start == "beginning":
            return 0
        if start == "end":
            return len(published_at)
        after = start.timestamp()
        return next((i for i, at in enumerate(published_at) if at >= after), len(published_at))

    async def _records(
        self,
        index: int,
        end: int | None,
        wanted: Callable[[OutboundMessage], bool],
        until: datetime | None,
    ) -> AsyncIterator[Record]:
        bus = self.broker.bus
        last = None if until is None else until.timestamp()
        while end is None or index < end:
            if index == len(bus.published):
                if last is not None and time.time() >= last:
                    return
                await asyncio.sleep(POLL_S)  # following: wait for more
                continue
            message, at = bus.published[index], bus.published_at[index]
            if wanted(message) and (last is None or at < last):
                yield Record(delivery(message, "memory", index), datetime.fromtimestamp(at, UTC))
            index += 1
