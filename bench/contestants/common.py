"""What every contestant shares: the baked service's modules, the data feeds and their
topics, loading them onto the broker, the clock each contestant is timed with."""

from __future__ import annotations

import asyncio
import importlib
import os
import random
import time
import uuid
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from google.protobuf.message import Message

KAFKA = os.environ.get("TEST_KAFKA_BOOTSTRAP", "127.0.0.1:19092")
AMQP = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
ETCD = os.environ.get("TEST_ETCD_ENDPOINTS", "127.0.0.1:12379")
PAYLOAD_BYTES = 1000
DUPLICATE_SHARE = 0.05
KEYS = 1000
BATCH = 500  # the service's default BATCH_SIZE; peers get the same batch/prefetch size
EXCHANGE = "events"  # the service's default AMQP_EXCHANGE
DEADLINE_S = 600.0
# What the relays (bare and FastStream) send, and the no-op handler's follow-up when it
# emits one: the incoming payload again, under a type nobody consumes here.
RELAYED_TYPE = "google.protobuf.BytesValue"
SINK_LENGTH = 1000  # RabbitMQ: relayed and emitted events kept (drop-head) by the sink


@dataclass(frozen=True)
class Bench:
    """One broker's run: the baked service (imported from its package) and the broker."""

    package: str
    broker: str  # "kafka" | "rabbitmq"
    latency_rate: int  # msg/s offered in the latency runs
    latency_seconds: float = 5.0  # for how long

    def module(self, name: str) -> ModuleType:
        return importlib.import_module(f"{self.package}.{name}")

    @property
    def wrappers(self) -> ModuleType:
        return importlib.import_module("google.protobuf.wrappers_pb2")

    def settings(self, run: str, contestant: str, **overrides: Any) -> Any:
        values: dict[str, Any] = {
            "broker_url": f"kafka://{KAFKA}" if self.broker == "kafka" else AMQP,
            "consumer_group": f"bench-{run}-{contestant}",
            "topic_prefix": f"bench-{run}.",
            "log_level": "WARNING",
        }
        return self.module("runtime.config").Settings(**{**values, **overrides})

    def codec(self) -> Any:
        envelope = self.module("runtime.envelope")
        return envelope.CloudEventsProtobufCodec(envelope.TypeRegistry())

    def output_types(self) -> list[str]:
        """Types the contestants emit or relay: Kafka topics to create, RabbitMQ routing
        keys the sink takes (so that nothing is parked as unroutable)."""
        order_events = self.module("events.orders_pb2")
        return [RELAYED_TYPE, order_events.StockReserved.DESCRIPTOR.full_name]


def topic(run: str, event_type: str) -> str:
    """The topic (routing key) the service reads `event_type` from, with the bench's prefix."""
    return f"bench-{run}.{event_type}"


def queue(run: str, contestant: str) -> str:
    return f"bench-{run}-{contestant}"  # = the service's CONSUMER_GROUP: its queue name


def queue_arguments(run: str, contestant: str) -> dict[str, Any]:
    """The arguments the service declares its quorum queue with; every contestant's queue
    gets the same, so all pay for the same durability."""
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": f"{queue(run, contestant)}.dlq",
        "x-delivery-limit": 20,
    }


# --- the data -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Feed:
    """A stream of events of one type: `text` (1 KB StringValue) for every handler shape
    and peer, `orders` (OrderPlaced) for the sample handler as baked."""

    name: str
    event_type: str

    def payload(self, bench: Bench, n: int, key: str) -> Message:
        if self.name == "text":
            value = f"{n:08d}".ljust(PAYLOAD_BYTES, "x")
            message: Message = bench.wrappers.StringValue(value=value)
            return message
        order = bench.module("events.orders_pb2").OrderPlaced(
            order_id=key, sku=f"sku-{n % 100}", quantity=1 + n % 5
        )
        # The order's own fields stay realistic (they are what the sample keeps as state
        # and emits); an unknown field pads the payload to the 1 KB of the other feed.
        padding = b"o" * (PAYLOAD_BYTES - order.ByteSize())
        order.MergeFromString(b"\x7a" + _varint(len(padding)) + padding)  # field 15, bytes
        return order


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def feeds(bench: Bench) -> dict[str, Feed]:
    order_placed = bench.module("events.orders_pb2").OrderPlaced.DESCRIPTOR.full_name
    return {
        "text": Feed("text", "google.protobuf.StringValue"),
        "orders": Feed("orders", order_placed),
    }


def events(bench: Bench, feed: Feed, count: int) -> list[tuple[bytes, str]]:
    """(envelope bytes, key): `count` messages of which DUPLICATE_SHARE repeat an id.
    Every feed has the same ids, keys and duplicates (one seed)."""
    rng = random.Random(7)
    codec = bench.codec()
    envelope = bench.module("runtime.envelope")
    unique = int(count / (1 + DUPLICATE_SHARE))
    made: list[tuple[bytes, str]] = []
    for n in range(unique):
        key = f"order-{rng.randrange(KEYS)}"
        body = codec.encode(
            envelope.Envelope(
                id=str(uuid.UUID(int=rng.getrandbits(128))),
                type=feed.event_type,
                source="urn:bench",
                payload=feed.payload(bench, n, key),
                subject=key,
                time=envelope.now(),
            )
        )
        made.append((body, key))
    while len(made) < count:  # a producer retrying: the same message again, a bit later
        position = rng.randrange(len(made))
        made.insert(min(len(made), position + rng.randrange(1, 200)), made[position])
    return made


# --- loading ------------------------------------------------------------------------------


async def create_kafka_topics(bench: Bench, run: str, feeds: list[Feed]) -> None:
    """The topics of `feeds` and their dead-letter topics, and those events are emitted
    and relayed to: 3 partitions each, made before any contestant starts (the loop runs
    with KAFKA_CREATE_TOPICS off, so that no contestant pays for creating them)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    settings = bench.settings(run, "topics")
    # The sample service also subscribes to the other types its handlers take.
    sample_types = bench.module("handlers").router.event_types()
    inputs = [topic(run, name) for name in {*(feed.event_type for feed in feeds), *sample_types}]
    wanted = {*inputs, *map(settings.dead_letter_topic_for, inputs)}
    wanted.update(topic(run, name) for name in bench.output_types())
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    await admin.start()
    try:
        missing = wanted - set(await admin.list_topics())
        if missing:
            await admin.create_topics([NewTopic(name, 3, 1) for name in sorted(missing)])
    finally:
        await admin.close()


async def load_kafka(bench: Bench, run: str, data: dict[Feed, list[tuple[bytes, str]]]) -> None:
    """Each feed onto its topic."""
    from aiokafka import AIOKafkaProducer

    await create_kafka_topics(bench, run, list(data))
    producer = AIOKafkaProducer(bootstrap_servers=KAFKA, acks="all", linger_ms=5)
    await producer.start()
    # As a service's producer sends them: the content type names the envelope's format.
    header = bench.module("runtime.brokers.base").CONTENT_TYPE_HEADER
    headers = [(header, bench.codec().content_type.encode())]
    try:
        for feed, messages in data.items():
            for start in range(0, len(messages), 5000):
                sends = [
                    await producer.send(
                        topic(run, feed.event_type), body, key=key.encode(), headers=headers
                    )
                    for body, key in messages[start : start + 5000]
                ]
                await asyncio.gather(*sends)
    finally:
        await producer.stop()


async def declare_sink(bench: Bench, channel: Any, run: str) -> None:
    """A bounded quorum queue bound to every output type: emitted and relayed events are
    routed (as they would be to a consuming service) instead of parked as unroutable."""
    import aio_pika

    exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    sink = await channel.declare_queue(
        queue(run, "sink"),
        durable=True,
        arguments={"x-queue-type": "quorum", "x-max-length": SINK_LENGTH},
    )
    for name in bench.output_types():
        await sink.bind(exchange, routing_key=topic(run, name))


async def load_rabbitmq(
    bench: Bench,
    run: str,
    data: dict[Feed, list[tuple[bytes, str]]],
    queues: dict[str, Feed],
) -> None:
    """A queue per contestant (label -> the feed it reads), bound to its feed's routing
    key; then each feed is published once, so every queue of a feed holds the same data."""
    import aio_pika

    connection = await aio_pika.connect(AMQP)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        await declare_sink(bench, channel, run)
        for name, feed in queues.items():
            declared = await channel.declare_queue(
                queue(run, name), durable=True, arguments=queue_arguments(run, name)
            )
            await declared.bind(exchange, routing_key=topic(run, feed.event_type))
        content_type = bench.codec().content_type  # as a service's producer sends it
        for feed, messages in data.items():
            if feed not in queues.values():
                continue  # nobody reads it this round
            for start in range(0, len(messages), 2000):
                await asyncio.gather(
                    *(
                        exchange.publish(
                            aio_pika.Message(
                                body,
                                content_type=content_type,
                                headers={"x-key": key},
                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            ),
                            routing_key=topic(run, feed.event_type),
                        )
                        for body, key in messages[start : start + 2000]
                    )
                )


async def drop_rabbitmq_queues(bench: Bench, run: str, contestants: list[str]) -> None:
    """A round's queues, once consumed, the sink, and the service's dead-letter and
    unrouted queues and exchanges beside each. Left bound to the exchange, they would
    take every later round's publishes too (each round's load would grow by the whole
    data set)."""
    import aio_pika

    connection = await aio_pika.connect(AMQP)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue(run, "sink"))
        for name in contestants:
            await channel.queue_delete(queue(run, name))
            settings = bench.settings(run, name)
            for parking in (settings.dead_letter_queue, settings.unrouted_queue):
                await channel.queue_delete(parking)  # absent for peers: a no-op
                await channel.exchange_delete(parking)


# --- timing -------------------------------------------------------------------------------


class Clock:
    """First message seen -> `total` messages done."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.first: float | None = None
        self.last = 0.0
        self.first_cpu = self.last_cpu = 0.0
        self.finished = asyncio.Event()

    def seen(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()
            self.first_cpu = time.process_time()

    def count(self, done: int) -> None:
        self.done += done
        if self.done >= self.total and not self.finished.is_set():
            self.last = time.perf_counter()
            self.last_cpu = time.process_time()
            self.finished.set()

    def result(self) -> dict[str, Any]:
        assert self.first is not None
        seconds = self.last - self.first
        cpu_us = (self.last_cpu - self.first_cpu) / self.done * 1e6
        return {
            "messages": self.done,
            "seconds": round(seconds, 3),
            "rate": self.done / seconds,
            "cpu_us_per_message": round(cpu_us, 1),  # this process's CPU, all threads
        }


async def wait_or_fail(finished: asyncio.Event, running: asyncio.Task[Any] | None) -> None:
    waiting = asyncio.ensure_future(finished.wait())
    watched = {waiting} | ({running} if running is not None else set())
    done, _ = await asyncio.wait(watched, timeout=DEADLINE_S, return_when="FIRST_COMPLETED")
    if waiting not in done:
        waiting.cancel()
        if running is not None and running.done():
            running.result()
        raise SystemExit("contestant did not finish in time")
