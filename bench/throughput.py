"""Throughput against peers, on one broker, same data, same run. Run with a baked
service's interpreter (FastStream installed beside it), from its folder:

    python throughput.py PACKAGE kafka|rabbitmq [--events 100000] [--json FILE]

Pre-loads --events envelopes (1 KB payloads, 5 % producer duplicates, 1000 keys) once,
then runs each contestant in its own process over the same data (Kafka: a fresh consumer
group on one 3-partition topic; RabbitMQ: its own quorum queue, filled by the same
publishes), timing from its first message to its last acknowledgement. Every contestant
runs --rounds times (fresh group or freshly filled queue each round); the best round
counts, since noise on a shared machine only ever slows a run down:

- ours: the generated service's loop with a no-op handler (memory state; etcd state;
  etcd state with tracing sampled at 1 %);
- bare: the client library alone (aiokafka getmany + one commit per batch; aio-pika with
  one multiple-ack per batch): the practical ceiling;
- FastStream with AckPolicy.ACK (ack after processing) and ACK_FIRST (at-most-once).

Then, for ours: p50/p99 publish-to-ack latency at a steady offered rate, etcd
transactions against messages per second, and each process's peak RSS. Prints a table,
the ratios ours/peer against the targets, and writes everything as JSON with --json.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from importlib import metadata
from pathlib import Path
from typing import Any

parser = argparse.ArgumentParser()
parser.add_argument("package")
parser.add_argument("broker", choices=["kafka", "rabbitmq"])
parser.add_argument("--events", type=int, default=100_000)
parser.add_argument("--json", type=Path, default=None)
parser.add_argument("--latency-rate", type=int, default=2000, help="msg/s for the latency run")
parser.add_argument("--rounds", type=int, default=5, help="runs per contestant; the best counts")
parser.add_argument("--contestant", default=None, help=argparse.SUPPRESS)  # child process
parser.add_argument("--run", default=None, help=argparse.SUPPRESS)
parser.add_argument("--label", default=None, help=argparse.SUPPRESS)  # group / queue suffix
args = parser.parse_args()

PACKAGE = args.package
config = importlib.import_module(f"{PACKAGE}.runtime.config")
app = importlib.import_module(f"{PACKAGE}.runtime.app")
runtime = importlib.import_module(f"{PACKAGE}.runtime")
envelope_module = importlib.import_module(f"{PACKAGE}.runtime.envelope")
telemetry = importlib.import_module(f"{PACKAGE}.runtime.telemetry")
wrappers = importlib.import_module("google.protobuf.wrappers_pb2")

KAFKA = os.environ.get("TEST_KAFKA_BOOTSTRAP", "127.0.0.1:19092")
AMQP = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
ETCD = os.environ.get("TEST_ETCD_ENDPOINTS", "127.0.0.1:12379")
EVENT_TYPE = "google.protobuf.StringValue"
PAYLOAD_BYTES = 1000
DUPLICATE_SHARE = 0.05
KEYS = 1000
BATCH = 500  # the service's default BATCH_SIZE; peers get the same batch/prefetch size
EXCHANGE = "events"  # the service's default AMQP_EXCHANGE
DEADLINE_S = 600.0


def settings_for(run: str, contestant: str, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "broker_url": f"kafka://{KAFKA}" if args.broker == "kafka" else AMQP,
        "consumer_group": f"bench-{run}-{contestant}",
        "topic_prefix": f"bench-{run}.",
        "log_level": "WARNING",
    }
    return config.Settings(**{**values, **overrides})


def topic(run: str) -> str:
    return f"bench-{run}.{EVENT_TYPE}"


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


def events(count: int) -> list[tuple[bytes, str]]:
    """(envelope bytes, key): `count` messages of which DUPLICATE_SHARE repeat an id."""
    rng = random.Random(7)
    codec = envelope_module.CloudEventsProtobufCodec(envelope_module.TypeRegistry())
    unique = int(count / (1 + DUPLICATE_SHARE))
    made: list[tuple[bytes, str]] = []
    for n in range(unique):
        key = f"order-{rng.randrange(KEYS)}"
        payload = wrappers.StringValue(value=f"{n:08d}".ljust(PAYLOAD_BYTES, "x"))
        made.append(
            (
                codec.encode(
                    envelope_module.Envelope(
                        id=str(uuid.UUID(int=rng.getrandbits(128))),
                        type=EVENT_TYPE,
                        source="urn:bench",
                        payload=payload,
                        subject=key,
                        time=envelope_module.now(),
                    )
                ),
                key,
            )
        )
    while len(made) < count:  # a producer retrying: the same message again, a bit later
        position = rng.randrange(len(made))
        made.insert(min(len(made), position + rng.randrange(1, 200)), made[position])
    return made


# --- loading ------------------------------------------------------------------------


async def load_kafka(run: str, data: list[tuple[bytes, str]]) -> None:
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    await admin.start()
    try:
        # With its dead-letter topic: the service runs with KAFKA_CREATE_TOPICS off.
        await admin.create_topics(
            [NewTopic(name, 3, 1) for name in (topic(run), f"{topic(run)}.dlq")]
        )
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=KAFKA, acks="all", linger_ms=5)
    await producer.start()
    try:
        for start in range(0, len(data), 5000):
            sends = [
                await producer.send(topic(run), body, key=key.encode())
                for body, key in data[start : start + 5000]
            ]
            await asyncio.gather(*sends)
    finally:
        await producer.stop()


async def load_rabbitmq(run: str, data: list[tuple[bytes, str]], contestants: list[str]) -> None:
    import aio_pika

    connection = await aio_pika.connect(AMQP)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        for name in contestants:
            declared = await channel.declare_queue(
                queue(run, name), durable=True, arguments=queue_arguments(run, name)
            )
            await declared.bind(exchange, routing_key=topic(run))
        for start in range(0, len(data), 2000):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            body,
                            headers={"x-key": key},
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        routing_key=topic(run),
                    )
                    for body, key in data[start : start + 2000]
                )
            )


async def drop_rabbitmq_queues(run: str, contestants: list[str]) -> None:
    """A round's queues, once consumed, and the service's dead-letter queue and exchange
    beside each. Left bound to the exchange, they would take every later round's
    publishes too (each round's load would grow by the whole data set)."""
    import aio_pika

    connection = await aio_pika.connect(AMQP)
    async with connection:
        channel = await connection.channel()
        for name in contestants:
            await channel.queue_delete(queue(run, name))
            await channel.queue_delete(f"{queue(run, name)}.dlq")  # absent for peers: a no-op
            await channel.exchange_delete(f"{queue(run, name)}.dlq")


# --- contestants (each runs in its own process) -----------------------------------------


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


async def ours(run: str, name: str, total: int, state: str, sample: float | None) -> dict[str, Any]:
    tracer_provider = None
    if sample is not None:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        class Discard(SpanExporter):
            def export(self, spans: Any) -> Any:
                from opentelemetry.sdk.trace.export import SpanExportResult

                return SpanExportResult.SUCCESS

        # As the service makes it with OTEL_TRACES_SAMPLER=parentbased_traceidratio.
        tracer_provider = telemetry.tracer_provider(sampler=ParentBased(TraceIdRatioBased(sample)))
        tracer_provider.add_span_processor(BatchSpanProcessor(Discard()))
    overrides: dict[str, Any] = {}
    if state == "etcd":
        overrides["state_url"] = f"etcd://{ETCD}"
        os.environ[f"{config.ENV_PREFIX}ETCD_KEY_PREFIX"] = f"/bench-{run}"
    if args.broker == "kafka":
        os.environ[f"{config.ENV_PREFIX}KAFKA_CREATE_TOPICS"] = "false"
    settings = settings_for(run, name, **overrides)
    router = runtime.Router()

    @router.handles(wrappers.StringValue)
    async def noop(event: Any, ctx: Any) -> None:
        return None

    loop = app.build_loop(settings, router, tracer_provider=tracer_provider)
    app.tune_garbage_collection()  # as `<service> run` does
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
    return result


async def wait_or_fail(finished: asyncio.Event, running: asyncio.Task[Any] | None) -> None:
    waiting = asyncio.ensure_future(finished.wait())
    watched = {waiting} | ({running} if running is not None else set())
    done, _ = await asyncio.wait(watched, timeout=DEADLINE_S, return_when="FIRST_COMPLETED")
    if waiting not in done:
        waiting.cancel()
        if running is not None and running.done():
            running.result()
        raise SystemExit("contestant did not finish in time")


async def bare_aiokafka(run: str, name: str, total: int) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic(run),
        bootstrap_servers=KAFKA,
        group_id=f"bench-{run}-{name}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    clock = Clock(total)
    try:
        while not clock.finished.is_set():
            batches = await consumer.getmany(timeout_ms=200, max_records=BATCH)
            if batches:
                clock.seen()
                await consumer.commit()
                clock.count(sum(len(records) for records in batches.values()))
    finally:
        await consumer.stop()
    return clock.result()


async def bare_aio_pika(run: str, name: str, total: int) -> dict[str, Any]:
    import aio_pika

    clock = Clock(total)
    connection = await aio_pika.connect(AMQP)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=2 * BATCH)
        declared = await channel.declare_queue(
            queue(run, name), durable=True, arguments=queue_arguments(run, name)
        )
        pending: list[Any] = []
        async with declared.iterator() as messages:
            async for message in messages:
                clock.seen()
                pending.append(message)
                if len(pending) >= BATCH or clock.done + len(pending) >= total:
                    await pending[-1].ack(multiple=True)
                    clock.count(len(pending))
                    pending.clear()
                    if clock.finished.is_set():
                        break
    return clock.result()


async def faststream(run: str, name: str, total: int, policy: str) -> dict[str, Any]:
    from faststream import AckPolicy

    ack_policy = AckPolicy.ACK if policy == "ack" else AckPolicy.ACK_FIRST
    clock = Clock(total)

    async def handle(body: bytes) -> None:
        clock.seen()
        clock.count(1)

    broker: Any
    if args.broker == "kafka":
        from faststream.kafka import KafkaBroker

        broker = KafkaBroker(KAFKA, logger=None)
        broker.subscriber(
            topic(run),
            group_id=f"bench-{run}-{name}",
            auto_offset_reset="earliest",
            ack_policy=ack_policy,
            max_records=BATCH,
        )(handle)
    else:
        from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

        broker = RabbitBroker(AMQP, logger=None, default_channel=Channel(prefetch_count=2 * BATCH))
        broker.subscriber(
            RabbitQueue(
                queue(run, name),
                durable=True,
                arguments=queue_arguments(run, name),
            ),
            ack_policy=ack_policy,
        )(handle)
    await broker.start()
    try:
        await wait_or_fail(clock.finished, None)
        # ACK commits after the handler returns: let the last acknowledgement go out.
        await asyncio.sleep(0.2)
    finally:
        await broker.stop()
    return clock.result()


async def latency(run: str, name: str, rate: int) -> dict[str, Any]:
    """Publish at `rate` msg/s for 5 s while the loop (etcd state) runs; time each
    message from its publish to its acknowledgement. Its own topic: nothing pre-loaded."""
    run = f"{run}-latency"
    settings = settings_for(run, name, state_url=f"etcd://{ETCD}")
    os.environ[f"{config.ENV_PREFIX}ETCD_KEY_PREFIX"] = f"/bench-{run}"
    router = runtime.Router()

    @router.handles(wrappers.StringValue)
    async def noop(event: Any, ctx: Any) -> None:
        return None

    loop = app.build_loop(settings, router)
    app.tune_garbage_collection()
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
    await asyncio.sleep(2.0 if args.broker == "kafka" else 0.2)  # group joined
    producer = importlib.import_module(f"{PACKAGE}.runtime.brokers").open_broker(
        settings_for(run, f"{name}-producer")
    )
    await producer.start([])
    codec = envelope_module.CloudEventsProtobufCodec(envelope_module.TypeRegistry())
    outbound = importlib.import_module(f"{PACKAGE}.runtime.brokers.base").OutboundMessage
    count = rate * 5
    began = time.perf_counter()
    for n in range(count):
        body = codec.encode(
            envelope_module.Envelope(
                id=str(uuid.uuid4()),
                type=EVENT_TYPE,
                source="urn:bench",
                payload=wrappers.StringValue(value="x" * PAYLOAD_BYTES),
                subject=f"order-{n % KEYS}",
            )
        )
        headers = {"x-sent-at": repr(time.time())}
        await producer.publish([outbound(topic(run), body, f"order-{n % KEYS}", headers)])
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
        "p50_ms": round(1000 * statistics.median(waits), 1),
        "p99_ms": round(1000 * waits[int(0.99 * (len(waits) - 1))], 1),
    }


def contestants(total: int) -> dict[str, Callable[[str, str], Awaitable[dict[str, Any]]]]:
    table: dict[str, Callable[[str, str], Awaitable[dict[str, Any]]]] = {
        "ours-memory-state": lambda run, name: ours(run, name, total, "memory", None),
        "ours-etcd-state": lambda run, name: ours(run, name, total, "etcd", None),
        "ours-etcd-traced-1pct": lambda run, name: ours(run, name, total, "etcd", 0.01),
        "faststream-ack": lambda run, name: faststream(run, name, total, "ack"),
        "faststream-ack-first": lambda run, name: faststream(run, name, total, "ack_first"),
    }
    if args.broker == "kafka":
        table["bare-aiokafka-batch"] = lambda run, name: bare_aiokafka(run, name, total)
    else:
        table["bare-aio-pika-multiple-ack"] = lambda run, name: bare_aio_pika(run, name, total)
    return table


def child(run: str, name: str, label: str) -> None:
    if name == "latency":
        result = asyncio.run(latency(run, label, args.latency_rate))
    else:
        result = asyncio.run(contestants(args.events)[name](run, label))
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from
    the parent across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# --- the run ------------------------------------------------------------------------------

TARGETS = {
    "kafka": [
        ("ours-etcd-state", "faststream-ack", 15.0),
        ("ours-etcd-state", "faststream-ack-first", 1.5),
        ("ours-etcd-state", "bare-aiokafka-batch", 0.5),
    ],
    "rabbitmq": [
        ("ours-etcd-state", "faststream-ack", 1.5),
        ("ours-etcd-state", "bare-aio-pika-multiple-ack", 0.8),
    ],
}


def run_child(run: str, name: str, label: str) -> dict[str, Any]:
    command = [sys.executable, __file__, PACKAGE, args.broker, "--events", str(args.events)]
    command += ["--latency-rate", str(args.latency_rate), "--contestant", name, "--run", run]
    command += ["--label", label, "--rounds", str(args.rounds)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE_S + 60)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def versions() -> dict[str, str]:
    names = ["aiokafka", "aio-pika", "faststream", "aetcd", "protobuf", "opentelemetry-sdk"]
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def main() -> None:
    run = uuid.uuid4().hex[:8]
    names = list(contestants(args.events))
    print(
        f"{args.events} events ({PAYLOAD_BYTES} B payloads, {DUPLICATE_SHARE:.0%} duplicates,"
        f" {KEYS} keys) on {args.broker}, {args.rounds} rounds",
        file=sys.stderr,
    )
    data = events(args.events)
    results: dict[str, dict[str, Any]] = {}
    rounds: list[dict[str, float]] = []  # each round's rates: ratios within one round
    for round_number in range(1, args.rounds + 1):
        # Kafka: one topic, a new consumer group per contestant and round. RabbitMQ: a
        # queue per contestant and round, filled by the same publishes.
        labels = [f"{name}-r{round_number}" for name in names]
        began = time.perf_counter()
        if args.broker == "kafka":
            if round_number == 1:
                asyncio.run(load_kafka(run, data))
        else:
            asyncio.run(load_rabbitmq(run, data, labels))
        loaded = time.perf_counter() - began
        print(f"round {round_number}: loaded in {loaded:.1f} s", file=sys.stderr)
        rounds.append({})
        for name, label in zip(names, labels, strict=True):
            result = run_child(run, name, label)
            rounds[-1][name] = result["rate"]
            print(f"  {name}: {result['rate']:.0f} msg/s", file=sys.stderr)
            if name not in results or result["rate"] > results[name]["rate"]:
                results[name] = result
        if args.broker == "rabbitmq":
            asyncio.run(drop_rabbitmq_queues(run, labels))
    print("latency ...", file=sys.stderr)
    results["latency"] = run_child(run, "latency", "latency")
    if args.broker == "rabbitmq":  # the latency run's own queues (see latency())
        asyncio.run(drop_rabbitmq_queues(f"{run}-latency", ["latency", "latency-producer"]))

    pairs = [*TARGETS[args.broker], ("ours-etcd-traced-1pct", "ours-etcd-state", 0.85)]
    ratios = [
        {
            "ours": ours_name,
            "peer": peer,
            "ratio": round(results[ours_name]["rate"] / results[peer]["rate"], 2),
            "target": target,
            # The same pair within each round: the spread the machine's noise makes.
            "per_round": [round(rates[ours_name] / rates[peer], 2) for rates in rounds],
        }
        for ours_name, peer, target in pairs
    ]
    report = {
        "broker": args.broker,
        "events": args.events,
        "payload_bytes": PAYLOAD_BYTES,
        "duplicate_share": DUPLICATE_SHARE,
        "batch_size": BATCH,
        "rounds": args.rounds,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "versions": versions(),
        "results": results,
        "ratios": ratios,
    }
    print_report(report)
    if args.json is not None:
        existing = json.loads(args.json.read_text()) if args.json.exists() else {}
        existing[args.broker] = report
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(existing, indent=2) + "\n")


def print_report(report: dict[str, Any]) -> None:
    print(
        f"\n{report['broker']}: {report['events']} events, {report['payload_bytes']} B payloads,"
        f" {report['duplicate_share']:.0%} duplicates; {report['machine']}"
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    print(
        f"{'contestant':30} {'msg/s':>10} {'seconds':>8} {'CPU us/msg':>11} {'peak RSS MB':>12}"
        f" {'store writes/s':>15}"
    )
    for name, result in report["results"].items():
        if name == "latency":
            continue
        writes = result.get("store_writes_per_s")
        print(
            f"{name:30} {result['rate']:10.0f} {result['seconds']:8.2f} "
            f"{result['cpu_us_per_message']:11.1f} {result['peak_rss_mb']:12.1f} "
            f"{'' if writes is None else f'{writes:15.1f}'}"
        )
    lat = report["results"]["latency"]
    print(
        f"publish -> ack at {lat['offered_rate']} msg/s (etcd state): p50 {lat['p50_ms']} ms,"
        f" p99 {lat['p99_ms']} ms over {lat['messages']} messages"
    )
    print("ratios (ours / peer, target):")
    for row in report["ratios"]:
        mark = "met" if row["ratio"] >= row["target"] else "NOT met"
        pair = f"{row['ours']} / {row['peer']}"
        per_round = ", ".join(f"{ratio:.2f}" for ratio in row["per_round"])
        print(
            f"  {pair}: {row['ratio']:.2f} (target >= {row['target']}) {mark};"
            f" within each round: {per_round}"
        )


if __name__ == "__main__":
    if args.contestant is not None:
        child(args.run, args.contestant, args.label or args.contestant)
    else:
        main()
