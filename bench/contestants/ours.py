"""The generated service's loop, with one handler shape per contestant, timed from its
first fetched batch to its last acknowledgement; and its publish-to-ack latency."""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
import uuid
from typing import Any

from .common import (
    AMQP,
    ETCD,
    KEYS,
    Bench,
    Clock,
    Feed,
    create_kafka_topics,
    declare_sink,
    topic,
    wait_or_fail,
)

# Handler shapes: what a contestant's service does with each event. All but `sample`
# handle the `text` feed; `sample` is the baked service's own router (handlers.py).
SHAPES = ("noop", "emit-one", "stateful", "sample")


def start_like_the_service(bench: Bench, settings: Any) -> None:
    """What `<service> run` does before its loop: logging at the settings' level (INFO: the
    sample handler's debug lines are not written), to stderr here (stdout carries the
    result), and its garbage-collection tuning."""
    bench.module("runtime.logs").configure_logging(settings, sys.stderr)
    bench.module("runtime.app").tune_garbage_collection()


def router_for(bench: Bench, shape: str) -> Any:
    if shape == "sample":
        return bench.module("handlers").router  # as baked: state + emit
    wrappers = bench.wrappers
    router = bench.module("runtime").Router()
    if shape == "noop":

        @router.handles(wrappers.StringValue)
        async def noop(event: Any, ctx: Any) -> None:
            return None

    elif shape == "emit-one":

        @router.handles(wrappers.StringValue)
        async def emit_one(event: Any, ctx: Any) -> None:
            # One follow-up per event, the size of what a relay forwards (the payload).
            ctx.emit(wrappers.BytesValue(value=event.value.encode()))

    elif shape == "stateful":

        @router.handles(wrappers.StringValue, stateful=True)
        async def count(event: Any, ctx: Any) -> None:
            ctx.state["seen"] = ctx.state.get("seen", 0) + 1

    else:
        raise ValueError(f"unknown handler shape {shape!r}")
    return router


def prepare(bench: Bench, run: str, state: str) -> dict[str, Any]:
    """Settings overrides and environment common to every run of the loop here."""
    overrides: dict[str, Any] = {}
    config = bench.module("runtime.config")
    if state == "etcd":
        overrides["state_url"] = f"etcd://{ETCD}"
        os.environ[f"{config.ENV_PREFIX}ETCD_KEY_PREFIX"] = f"/bench-{run}"
    if bench.broker == "kafka":  # the bench created every topic (common.load_kafka)
        os.environ[f"{config.ENV_PREFIX}KAFKA_CREATE_TOPICS"] = "false"
    return overrides


async def ours(
    bench: Bench, run: str, name: str, total: int, state: str, shape: str, sample: float | None
) -> dict[str, Any]:
    telemetry, app = bench.module("runtime.telemetry"), bench.module("runtime.app")
    tracer_provider = None
    if sample is not None:
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        class Discard(SpanExporter):
            def export(self, spans: Any) -> Any:
                return SpanExportResult.SUCCESS

        # As the service makes it with OTEL_TRACES_SAMPLER=parentbased_traceidratio.
        tracer_provider = telemetry.tracer_provider(sampler=ParentBased(TraceIdRatioBased(sample)))
        tracer_provider.add_span_processor(BatchSpanProcessor(Discard()))
    settings = bench.settings(run, name, **prepare(bench, run, state))
    loop = app.build_loop(settings, router_for(bench, shape), tracer_provider=tracer_provider)
    start_like_the_service(bench, settings)
    clock = Clock(total)
    commits = 0
    fetch_batch, ack, commit = loop.broker.fetch_batch, loop.broker.ack, loop.state.commit

    async def timed_fetch_batch(*a: Any) -> Any:
        batch = await fetch_batch(*a)
        if batch:
            clock.seen()
        return batch

    async def counted_ack(messages: Any) -> None:
        await ack(messages)
        clock.count(len(messages))

    async def counted_commit(*a: Any, **k: Any) -> None:
        nonlocal commits
        await commit(*a, **k)
        commits += 1

    loop.broker.fetch_batch, loop.broker.ack, loop.state.commit = (
        timed_fetch_batch,
        counted_ack,
        counted_commit,
    )
    stop = asyncio.Event()
    running = asyncio.create_task(loop.run(stop))
    await wait_or_fail(clock.finished, running)
    stop.set()
    stats = await running
    result = clock.result()
    result["store_writes_per_s"] = commits / result["seconds"]
    result["duplicates_dropped"] = stats.duplicates
    result["emitted"] = stats.emitted
    result["unrouted"] = stats.unrouted  # RabbitMQ: emitted with no queue bound (0: the sink)
    result["dead_lettered"] = sum(stats.dead_lettered.values())
    return result


async def latency(bench: Bench, run: str, name: str, feed: Feed, shape: str) -> dict[str, Any]:
    """Publish `feed`'s events at a steady rate (`bench.latency_rate` msg/s for
    `bench.latency_seconds`) while the loop (etcd state, handler `shape`) runs; time each
    message from its publish to its acknowledgement. Its own topics: nothing pre-loaded."""
    run = f"{run}-{name}"
    app = bench.module("runtime.app")
    settings = bench.settings(run, name, **prepare(bench, run, "etcd"))
    if bench.broker == "kafka":
        await create_kafka_topics(bench, run, [feed])
    else:
        import aio_pika

        connection = await aio_pika.connect(AMQP)
        async with connection:
            await declare_sink(bench, await connection.channel(), run)
    loop = app.build_loop(settings, router_for(bench, shape))
    start_like_the_service(bench, settings)
    waits: list[float] = []
    ack = loop.broker.ack

    async def timed_ack(messages: Any) -> None:
        await ack(messages)
        now = time.time()
        waits.extend(now - float(m.headers["x-sent-at"]) for m in messages)

    loop.broker.ack = timed_ack
    stop = asyncio.Event()
    running = asyncio.create_task(loop.run(stop))
    await loop.started.wait()
    await asyncio.sleep(2.0 if bench.broker == "kafka" else 0.2)  # group joined
    producer = bench.module("runtime.brokers").open_broker(bench.settings(run, f"{name}-producer"))
    await producer.start([])
    codec, envelope = bench.codec(), bench.module("runtime.envelope")
    outbound = bench.module("runtime.brokers.base").OutboundMessage
    rate = bench.latency_rate
    count = round(rate * bench.latency_seconds)
    began = time.perf_counter()
    for n in range(count):
        key = f"order-{n % KEYS}"
        body = codec.encode(
            envelope.Envelope(
                id=str(uuid.uuid4()),
                type=feed.event_type,
                source="urn:bench",
                payload=feed.payload(bench, n, key),
                subject=key,
            )
        )
        headers = {"x-sent-at": repr(time.time())}
        await producer.publish([outbound(topic(run, feed.event_type), body, key, headers)])
        delay = began + (n + 1) / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
    deadline = time.monotonic() + 60
    while len(waits) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await producer.close()
    stop.set()
    await running
    waits.sort()
    return {
        "messages": len(waits),
        "offered_rate": rate,
        "handler": shape,
        "p50_ms": round(1000 * statistics.median(waits), 1),
        "p99_ms": round(1000 * waits[int(0.99 * (len(waits) - 1))], 1),
    }
