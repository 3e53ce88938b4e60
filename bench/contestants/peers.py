"""The peers: each client library alone (a batch loop, and a relay that produces one
event per message consumed), and FastStream. No decoding, no dedupe, no state."""

from __future__ import annotations

import asyncio
from typing import Any

from .common import (
    AMQP,
    BATCH,
    EXCHANGE,
    KAFKA,
    RELAYED_TYPE,
    Bench,
    Clock,
    Feed,
    queue,
    queue_arguments,
    topic,
    wait_or_fail,
)


async def bare_aiokafka(run: str, name: str, feed: Feed, total: int, relay: bool) -> dict[str, Any]:
    """getmany -> (relay: send one event per record, acks=all, and wait for all) -> one
    commit per batch."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    consumer = AIOKafkaConsumer(
        topic(run, feed.event_type),
        bootstrap_servers=KAFKA,
        group_id=f"bench-{run}-{name}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    # The service's own producer settings (runtime/brokers/kafka.py).
    producer = AIOKafkaProducer(
        bootstrap_servers=KAFKA, acks="all", enable_idempotence=False, linger_ms=2
    )
    relayed = topic(run, RELAYED_TYPE)
    await consumer.start()
    if relay:
        await producer.start()
    clock = Clock(total)
    try:
        while not clock.finished.is_set():
            batches = await consumer.getmany(timeout_ms=200, max_records=BATCH)
            if not batches:
                continue
            clock.seen()
            if relay:
                sends = [
                    await producer.send(relayed, record.value, key=record.key)
                    for records in batches.values()
                    for record in records
                ]
                await asyncio.gather(*sends)
            await consumer.commit()
            clock.count(sum(len(records) for records in batches.values()))
    finally:
        await consumer.stop()
        if relay:
            await producer.stop()
    return clock.result()


async def bare_aio_pika(run: str, name: str, total: int, relay: bool) -> dict[str, Any]:
    """Consume with a prefetch of two batches -> (relay: publish one event per message,
    persistent, and wait for every publisher confirm) -> one multiple-ack per batch."""
    import aio_pika

    clock = Clock(total)
    connection = await aio_pika.connect(AMQP)
    async with connection:
        channel = await connection.channel(publisher_confirms=relay)
        await channel.set_qos(prefetch_count=2 * BATCH)
        exchange = await channel.get_exchange(EXCHANGE, ensure=False)
        relayed = topic(run, RELAYED_TYPE)
        declared = await channel.declare_queue(
            queue(run, name), durable=True, arguments=queue_arguments(run, name)
        )
        pending: list[Any] = []
        async with declared.iterator() as messages:
            async for message in messages:
                clock.seen()
                pending.append(message)
                if len(pending) >= BATCH or clock.done + len(pending) >= total:
                    if relay:
                        await asyncio.gather(
                            *(
                                exchange.publish(
                                    aio_pika.Message(
                                        m.body,
                                        headers=m.headers,
                                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                    ),
                                    routing_key=relayed,
                                )
                                for m in pending
                            )
                        )
                    await pending[-1].ack(multiple=True)
                    clock.count(len(pending))
                    pending.clear()
                    if clock.finished.is_set():
                        break
    return clock.result()


async def faststream(
    bench: Bench, run: str, name: str, feed: Feed, total: int, policy: str, relay: bool
) -> dict[str, Any]:
    """A FastStream subscriber (AckPolicy.ACK: ack after the handler; ACK_FIRST: before);
    with `relay`, an `@publisher` sends what the handler returns (the message again)."""
    from faststream import AckPolicy

    ack_policy = AckPolicy.ACK if policy == "ack" else AckPolicy.ACK_FIRST
    clock = Clock(total)

    async def handle(body: bytes) -> bytes:
        clock.seen()
        clock.count(1)
        return body

    broker: Any
    relayed = topic(run, RELAYED_TYPE)
    if bench.broker == "kafka":
        from faststream.kafka import KafkaBroker

        # acks=all as the service's producer and the bare relay.
        broker = KafkaBroker(KAFKA, logger=None, acks="all")
        subscriber = broker.subscriber(
            topic(run, feed.event_type),
            group_id=f"bench-{run}-{name}",
            auto_offset_reset="earliest",
            ack_policy=ack_policy,
            max_records=BATCH,
        )
        publisher = broker.publisher(relayed)
    else:
        from faststream.rabbit import (
            Channel,
            ExchangeType,
            RabbitBroker,
            RabbitExchange,
            RabbitQueue,
        )

        # Publisher confirms are FastStream's default on its channels.
        broker = RabbitBroker(AMQP, logger=None, default_channel=Channel(prefetch_count=2 * BATCH))
        subscriber = broker.subscriber(
            RabbitQueue(queue(run, name), durable=True, arguments=queue_arguments(run, name)),
            ack_policy=ack_policy,
        )
        exchange = RabbitExchange(EXCHANGE, type=ExchangeType.TOPIC, durable=True)
        publisher = broker.publisher(exchange=exchange, routing_key=relayed)
    subscriber(publisher(handle) if relay else handle)
    await broker.start()
    try:
        await wait_or_fail(clock.finished, None)
        # ACK commits after the handler returns: let the last acknowledgement go out.
        await asyncio.sleep(0.2)
    finally:
        await broker.stop()
    return clock.result()
