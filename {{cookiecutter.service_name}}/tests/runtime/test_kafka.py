"""Kafka adapter units (removed from RabbitMQ services). Template-owned; do not edit."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder

from {{ cookiecutter.package_name }}.runtime.brokers.base import OutboundMessage
from {{ cookiecutter.package_name }}.runtime.brokers.kafka import (
    KafkaBroker,
    KafkaSettings,
    _Offsets,
    bootstrap_servers,
)
from {{ cookiecutter.package_name }}.runtime.brokers.kafka_batches import (
    Partitioner,
    record_batches,
)
from {{ cookiecutter.package_name }}.runtime.config import Settings, load_model
from {{ cookiecutter.package_name }}.runtime.errors import ConfigError

# murmur2 of these keys as the Java client computes it (Kafka's own UtilsTest vectors).
JAVA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize("partitions", [1, 3, 7, 12])
@pytest.mark.parametrize("key", sorted(JAVA_MURMUR2))
def test_keys_land_on_the_java_clients_partition(key: bytes, partitions: int) -> None:
    java_partition = (JAVA_MURMUR2[key] & 0x7FFFFFFF) % partitions
    every = list(range(partitions))
    assert DefaultPartitioner()(key, every, every) == java_partition


def test_only_the_contiguous_prefix_of_finished_offsets_is_committed() -> None:
    offsets = _Offsets()
    offsets.delivered += [10, 11, 12, 13]
    offsets.finished |= {11, 12}
    assert offsets.commit_point() is None  # 10 is still running
    offsets.finished.add(10)
    assert offsets.commit_point() == 13  # 10..12 done; 13 still running
    offsets.finished.add(13)
    assert offsets.commit_point() == 14
    assert offsets.commit_point() is None


def test_commit_points_follow_the_finished_prefix_in_any_order_of_finishing() -> None:
    rng = random.Random(5)
    for _ in range(300):
        offsets = _Offsets()
        delivered = sorted(rng.sample(range(1000), rng.randint(1, 40)))  # gaps: compaction
        offsets.delivered += delivered
        finishing = rng.sample(delivered, len(delivered))
        finished: set[int] = set()
        committed = 0  # offsets of the delivered prefix committed so far
        while finishing:
            now = finishing[: rng.randint(1, 6)]
            del finishing[: len(now)]
            offsets.finished.update(now)
            finished.update(now)
            prefix = committed
            while prefix < len(delivered) and delivered[prefix] in finished:
                prefix += 1
            expected = delivered[prefix - 1] + 1 if prefix > committed else None
            assert offsets.commit_point() == expected
            committed = prefix
        assert offsets.delivered == [] and offsets.finished == set()


async def test_closing_forgets_what_was_delivered_and_not_acked() -> None:
    """Rejoining after being fenced reuses the broker: deliveries of the old membership
    come again, and the ones never acked must not hold its commits back."""
    broker = KafkaBroker(Settings(broker_url="kafka://127.0.0.1:9"), KafkaSettings())
    broker._offsets[TopicPartition("t", 0)].delivered += [5, 6]
    broker._idle.clear()  # as fetch() leaves it
    await broker.close()
    assert not broker._offsets
    assert broker._idle.is_set()


class FakeConsumer:
    """What KafkaBroker asks of aiokafka's consumer; each getmany returns the next reply."""

    def __init__(self, *replies: dict[TopicPartition, list[int]]) -> None:
        self.replies = list(replies)
        self.getmany_calls = 0
        self.committed: dict[TopicPartition, int] = {}

    async def getmany(self, timeout_ms: int = 0) -> dict[TopicPartition, list[Any]]:
        self.getmany_calls += 1
        reply = self.replies.pop(0) if self.replies else {}
        return {
            partition: [
                SimpleNamespace(value=b"x", offset=offset, key=None, headers=())
                for offset in offsets
            ]
            for partition, offsets in reply.items()
        }

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition("t", 0), TopicPartition("t", 1)}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.committed.update(offsets)

    def highwater(self, partition: TopicPartition) -> int:
        return 10

    async def position(self, partition: TopicPartition) -> int:
        return 10


async def test_read_ahead_is_handed_out_by_batch_and_dropped_with_revoked_partitions() -> None:
    """The adapter empties aiokafka's buffer at once (so it fetches the next data while
    the loop works) and hands the loop its batches from that read-ahead. What is read
    ahead is not delivered yet: it holds no drain back, and a revoked partition's is
    dropped (its next owner starts from the committed offset)."""
    p0, p1 = TopicPartition("t", 0), TopicPartition("t", 1)
    broker = KafkaBroker(Settings(broker_url="kafka://127.0.0.1:9"), KafkaSettings())
    consumer = FakeConsumer({p0: [0, 1, 2, 3, 4], p1: [0, 1, 2]})
    broker._consumer = consumer

    first = await broker.fetch_batch(3, 0, 0)
    assert [(m.stream, m.position) for m in first] == [("t:0", 0), ("t:0", 1), ("t:0", 2)]
    assert consumer.getmany_calls == 1
    assert broker._offsets[p0].delivered == [0, 1, 2] and not broker._offsets[p1].delivered
    assert await broker.lag() == {"t:0": 10, "t:1": 10}  # read ahead counts as waiting

    await broker.ack(first)
    assert consumer.committed == {p0: 3}
    await broker.revoke({p1})  # drained at once: nothing delivered is unacked
    rest = await broker.fetch_batch(10, 0, 0)
    assert [(m.stream, m.position) for m in rest] == [("t:0", 3), ("t:0", 4)]
    assert consumer.getmany_calls == 1
    assert await broker.fetch_batch(10, 0, 0) == []
    assert consumer.getmany_calls == 2


def test_bootstrap_servers_come_from_the_url() -> None:
    assert bootstrap_servers("kafka://a:9092,b:9093") == ["a:9092", "b:9093"]


def test_sasl_without_credentials_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from {{ cookiecutter.package_name }}.runtime.config import ENV_PREFIX

    monkeypatch.setenv(f"{ENV_PREFIX}KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(ConfigError, match="SASL needs KAFKA_SASL_USERNAME"):
        load_model(KafkaSettings)


class BatchingProducer:
    """What `record_batches` asks of a producer: partitions (all led here) and batches."""

    def __init__(self, partitions: int, batch_bytes: int) -> None:
        self.partitions, self.batch_bytes = set(range(partitions)), batch_bytes
        self.client = SimpleNamespace(
            cluster=SimpleNamespace(available_partitions_for_topic=lambda _: self.partitions)
        )

    async def partitions_for(self, topic: str) -> set[int]:
        return self.partitions

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(self.batch_bytes, 0)


async def test_records_go_in_batches_per_partition_each_partitions_in_order() -> None:
    producer = BatchingProducer(partitions=3, batch_bytes=1_000)
    keys = ["a", "b", "c", "d"]
    messages = [OutboundMessage("t", bytes(300), keys[n % 4]) for n in range(40)]
    messages.append(OutboundMessage("t", bytes(5_000), "a"))  # larger than a batch: alone
    messages.append(OutboundMessage("t", b"x", "a", partition=2))  # placed, not partitioned

    batches = await record_batches(producer, messages, Partitioner())

    led = [0, 1, 2]
    where = {key: DefaultPartitioner()(key.encode(), led, led) for key in keys}
    for index, message in enumerate(messages[:-1]):
        [batch] = [batch for batch in batches if index in batch.indexes]
        assert batch.partition == where[message.key]
    [placed] = [batch for batch in batches if len(messages) - 1 in batch.indexes]
    assert placed.partition == 2
    for partition in led:
        mine = [batch for batch in batches if batch.partition == partition]
        assert [batch.number for batch in mine] == list(range(len(mine)))
        held = [index for batch in mine for index in batch.indexes]
        assert held == sorted(held)  # in the order given
        assert all(batch.builder.record_count() == len(batch.indexes) for batch in mine)
    assert any(batch.number > 0 for batch in batches)  # some partition needed several
    numbers = [batch.number for batch in batches]
    assert numbers == sorted(numbers)  # every first batch before any second
    [alone] = [batch for batch in batches if len(messages) - 2 in batch.indexes]
    assert alone.indexes == [len(messages) - 2]
    assert sum(len(batch.indexes) for batch in batches) == len(messages)


def test_the_partitioner_remembers_keys_until_the_partitions_change() -> None:
    partitioner = Partitioner()
    three, five = [0, 1, 2], [0, 1, 2, 3, 4]
    of_three = partitioner.of_topic("t", three, three)
    keys = [f"order-{n}".encode() for n in range(50)]
    assert [of_three(key) for key in keys] == [
        DefaultPartitioner()(key, three, three) for key in keys
    ]
    of_five = partitioner.of_topic("t", five, five)  # the topic grew: chosen afresh
    assert [of_five(key) for key in keys] == [DefaultPartitioner()(key, five, five) for key in keys]
    assert {partitioner.of_topic("t", five, [4])(None) for _ in range(20)} == {4}  # led only
