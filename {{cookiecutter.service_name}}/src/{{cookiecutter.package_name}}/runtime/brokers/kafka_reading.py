"""Operator reads on Kafka: partitions assigned by hand (no consumer group joined, no
offset committed), positioned by time with offsets-for-times. A redrive's progress is
the committed offset of a group of its own on the dead-letter topics, never the
service's group, and the dead-letter topics are never rewritten."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from ..config import Settings
from .base import BrokerUnavailable
from .kafka import KafkaBroker, _unavailable_on_error, inbound_messages
from .reading import BusReader, Reading, Record, Start

POLL_MS = 200  # a read looks at `until` (and at partitions it finished) this often


class KafkaReader(BusReader):
    broker: KafkaBroker

    def __init__(self, settings: Settings, broker: KafkaBroker) -> None:
        super().__init__(settings, broker)
        self._consumers: list[AIOKafkaConsumer] = []
        self._progress: AIOKafkaConsumer | None = None  # commits a redrive's progress

    async def close(self) -> None:
        for consumer in self._consumers:
            await consumer.stop()
        self._consumers.clear()
        await super().close()

    async def read(
        self, event_types: Sequence[str], start: Start, until: datetime | None, *, follow: bool
    ) -> Reading:
        consumer = await self._consumer(None)
        topics = [self.settings.topic_for(event_type) for event_type in event_types]
        return await self._read(consumer, topics, start, until, follow=follow)

    async def parked(
        self, event_types: Sequence[str], resume: str | None = None, bound: int | None = None
    ) -> Reading:
        consumer = await self._consumer(resume)
        if resume is not None:
            self._progress = consumer
        topics = {
            self.settings.dead_letter_topic_for(self.settings.topic_for(event_type))
            for event_type in event_types
        }
        return await self._read(consumer, sorted(topics), "beginning", None, follow=False)

    async def settle(self, read: Sequence[Record], redriven: Sequence[Record]) -> None:
        if self._progress is None or not read:
            return
        past = {record.message.handle: record.message.position + 1 for record in read}
        await _unavailable_on_error(self._progress.commit(past))

    async def _consumer(self, group_id: str | None) -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(
            **self.broker._client_options(),
            group_id=group_id,  # None: no group at all
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await _unavailable_on_error(consumer.start())
        self._consumers.append(consumer)
        return consumer

    async def _read(
        self,
        consumer: AIOKafkaConsumer,
        topics: Iterable[str],
        start: Start,
        until: datetime | None,
        *,
        follow: bool,
    ) -> Reading:
        existing = await _unavailable_on_error(consumer.topics())
        partitions = [
            TopicPartition(topic, number)
            for topic in topics
            if topic in existing
            for number in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        if not partitions:
            return Reading(_nothing(), 0)
        consumer.assign(partitions)
        first = await self._first(consumer, partitions, start)
        stop: dict[TopicPartition, int | None] | None = None
        total = None
        if not follow:  # bounded by `until` where the broker tells the offset
            none: dict[TopicPartition, int | None] = dict.fromkeys(partitions)
            stop = none if until is None else await self._at_time(consumer, partitions, until)
            end = await _unavailable_on_error(consumer.end_offsets(partitions))
            total = sum(max(0, (stop[p] or end[p]) - first[p]) for p in partitions)  # near
        for partition, offset in first.items():
            consumer.seek(partition, offset)
        since = start if isinstance(start, datetime) else None
        return Reading(self._records(consumer, first, stop, since, until), total)

    async def _first(
        self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition], start: Start
    ) -> dict[TopicPartition, int]:
        """Where each partition's read starts; by time, the first offset at or after it."""
        if start == "end":
            return dict(await _unavailable_on_error(consumer.end_offsets(partitions)))
        beginning = await _unavailable_on_error(consumer.beginning_offsets(partitions))
        if self._progress is consumer:  # a redrive resumes where it got to
            return {p: await self._committed(consumer, p, beginning[p]) for p in partitions}
        if start == "beginning":
            return dict(beginning)
        at = await self._at_time(consumer, partitions, start)
        # Unknown: from the beginning; the records' timestamps then tell.
        return {p: beginning[p] if (offset := at[p]) is None else offset for p in partitions}

    async def _at_time(
        self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition], when: datetime
    ) -> dict[TopicPartition, int | None]:
        """The first offset stamped at or after `when`; None where there is none, or the
        broker cannot tell (it answers without a timestamp)."""
        milliseconds = int(when.timestamp() * 1000)
        found = await _unavailable_on_error(
            consumer.offsets_for_times(dict.fromkeys(partitions, milliseconds))
        )
        hits = {partition: found.get(partition) for partition in partitions}
        return {
            p: None if hit is None or hit.timestamp < 0 else hit.offset for p, hit in hits.items()
        }

    async def _committed(
        self, consumer: AIOKafkaConsumer, partition: TopicPartition, default: int
    ) -> int:
        committed = await _unavailable_on_error(consumer.committed(partition))
        return default if committed is None else max(int(committed), default)

    async def _records(
        self,
        consumer: AIOKafkaConsumer,
        first: Mapping[TopicPartition, int],
        stop: Mapping[TopicPartition, int | None] | None,
        since: datetime | None,
        until: datetime | None,
    ) -> AsyncIterator[Record]:
        # Records are stamped in whole milliseconds: bounds too, or a record stamped in
        # the bound's own millisecond would fall outside it.
        since_ms = None if since is None else int(since.timestamp() * 1000)
        until_ms = None if until is None else int(until.timestamp() * 1000)
        # A read that does not follow stops at the high watermark of its first fetch (what
        # the partition held then: not what a replay into it adds), or earlier at `until`'s
        # offset. (Some Kafka-protocol brokers answer a list-offsets for the end with the
        # last batch's first offset; a fetch's high watermark is right on every one.)
        limits: dict[TopicPartition, int] = {}
        left = None if stop is None else set(first)
        while left is None or left:
            if left is None and until is not None and datetime.now(UTC) >= until:
                return  # following, and the window closed
            try:
                fetched = await consumer.getmany(timeout_ms=POLL_MS)
            except KafkaError as error:
                raise BrokerUnavailable(f"kafka: {error!r}") from error
            if stop is not None:
                for partition in first.keys() - limits.keys():
                    if (highwater := consumer.highwater(partition)) is not None:
                        at_until = stop[partition]
                        limits[partition] = (
                            highwater if at_until is None else min(highwater, at_until)
                        )
            for partition, records in fetched.items():
                limit = limits.get(partition)
                kept = [
                    record
                    for record in records
                    if (limit is None or record.offset < limit)
                    and (since_ms is None or record.timestamp >= since_ms)
                    and (until_ms is None or record.timestamp < until_ms)
                ]
                for message, record in zip(inbound_messages(partition, kept), kept, strict=True):
                    yield Record(message, _time(record))
            if left is not None:
                for partition in list(left & limits.keys()):
                    if await consumer.position(partition) >= limits[partition]:
                        left.discard(partition)
                        consumer.pause(partition)


def _time(record: Any) -> datetime | None:
    stamp: int = record.timestamp
    return datetime.fromtimestamp(stamp / 1000, UTC) if stamp >= 0 else None


async def _nothing() -> AsyncIterator[Record]:
    return
    yield  # an async generator that yields nothing
