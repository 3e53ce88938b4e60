"""Records to publish as Kafka record batches, one partition each: what `KafkaBroker.publish`
hands aiokafka (`create_batch` / `send_batch`). Sent one by one (`send`), each record cost
a future, a metadata wait and a pure-Python murmur2; a batch costs one future, and each
record a C-level append."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder

from .base import OutboundMessage, binary_headers

# Keys whose partition is remembered per topic; beyond that the memo starts afresh.
REMEMBERED_KEYS = 100_000

PartitionOf = Callable[[bytes | None], int]


class Partitioner:
    """Chooses partitions as aiokafka's `send` does: its default partitioner (the Java
    client's murmur2 of the key, so a key lands where any producer puts it; a partition
    with a leader at random for no key). A key's partition is remembered per topic and
    partition list: murmur2 is pure Python, a few µs per key."""

    def __init__(self) -> None:
        self._choose = DefaultPartitioner()
        self._known: dict[str, tuple[list[int], dict[bytes, int]]] = {}

    def of_topic(self, topic: str, partitions: list[int], available: list[int]) -> PartitionOf:
        """`partitions`: all of the topic's, sorted; `available`: those with a leader."""
        known = self._known.get(topic)
        if known is None or known[0] != partitions or len(known[1]) >= REMEMBERED_KEYS:
            known = self._known[topic] = (partitions, {})
        by_key, choose = known[1], self._choose

        def partition_of(key: bytes | None) -> int:
            if key is None:
                return int(choose(None, partitions, available))
            partition = by_key.get(key)
            if partition is None:
                partition = by_key[key] = int(choose(key, partitions, available))
            return partition

        return partition_of


@dataclass(slots=True)
class RecordBatch:
    """Records for one partition, in order; `indexes` says which of the messages they are."""

    topic: str
    partition: int
    builder: BatchBuilder
    number: int  # batches of its partition before it
    indexes: list[int] = field(default_factory=list)

    def add(self, index: int, key: bytes | None, message: OutboundMessage) -> bool:
        """False when full. A batch takes its first record whatever its size."""
        headers = binary_headers(message.headers)
        added = self.builder.append(timestamp=None, key=key, value=message.body, headers=headers)
        if added is None:
            return False
        self.indexes.append(index)
        return True


async def record_batches(
    producer: AIOKafkaProducer, messages: Sequence[OutboundMessage], partitioner: Partitioner
) -> list[RecordBatch]:
    """`messages` in batches of at most the producer's batch size, each partition's in the
    order given; every partition's first batch comes before any partition's second (the
    producer holds one batch per partition until it is sent)."""
    partition_of: dict[str, PartitionOf] = {}
    for topic in dict.fromkeys(message.topic for message in messages):
        partitions = sorted(await producer.partitions_for(topic))  # waits for metadata
        led = producer.client.cluster.available_partitions_for_topic(topic)
        partition_of[topic] = partitioner.of_topic(topic, partitions, sorted(led or ()))
    batches: list[RecordBatch] = []
    filling: dict[tuple[str, int], RecordBatch] = {}
    for index, message in enumerate(messages):
        topic = message.topic
        key = message.key.encode() if message.key else None
        partition = message.partition
        if partition is None:
            partition = partition_of[topic](key)
        batch = filling.get((topic, partition))
        if batch is None or not batch.add(index, key, message):
            number = 0 if batch is None else batch.number + 1
            batch = RecordBatch(topic, partition, producer.create_batch(), number)
            filling[topic, partition] = batch
            batches.append(batch)
            batch.add(index, key, message)
    batches.sort(key=attrgetter("number"))  # stable: each partition's stay in order
    return batches
