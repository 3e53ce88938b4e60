"""Crash test driver: run with a baked service's interpreter, from the service's folder.

    python driver.py PACKAGE OUT_DIR

It starts `python -m PACKAGE run` against the broker in TEST_KAFKA_BOOTSTRAP or
TEST_AMQP_URL (state in SQLite, or in etcd at TEST_ETCD_ENDPOINTS with
CRASH_STATE=etcd), publishes events (with producer duplicates and poison), SIGKILLs the
service at random moments and restarts it, then publishes duplicates of handled events
and checks they are dropped. It prints one JSON object of figures on stdout.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

PACKAGE, OUT = sys.argv[1], Path(sys.argv[2])
EVENTS = int(os.environ.get("CRASH_EVENTS", "3000"))
KILLS = int(os.environ.get("CRASH_KILLS", "5"))
BATCH_SIZE = int(os.environ.get("CRASH_BATCH_SIZE", "100"))
POISON = 20
KEYS = [f"k{n}" for n in range(12)]
SEED = int(os.environ.get("CRASH_SEED", str(random.randrange(1 << 30))))

sys.path.insert(0, str(Path.cwd()))  # the baked service's tests/ package
runtime = importlib.import_module(f"{PACKAGE}.runtime")
config = importlib.import_module(f"{PACKAGE}.runtime.config")
brokers = importlib.import_module(f"{PACKAGE}.runtime.brokers")
envelope = importlib.import_module(f"{PACKAGE}.runtime.envelope")
orders = importlib.import_module(f"{PACKAGE}.events.orders_pb2")

if os.environ.get("TEST_KAFKA_BOOTSTRAP"):
    BROKER_URL = f"kafka://{os.environ['TEST_KAFKA_BOOTSTRAP']}"
    support = importlib.import_module("tests.integration.kafka_support")
else:
    BROKER_URL = os.environ["TEST_AMQP_URL"]
    support = importlib.import_module("tests.integration.rabbitmq_support")

if os.environ.get("CRASH_STATE", "sqlite") == "etcd":
    STATE_URL = f"etcd://{os.environ['TEST_ETCD_ENDPOINTS']}"
else:
    STATE_URL = f"sqlite://{OUT / 'state.db'}"

RUN = uuid.uuid4().hex[:8]
PREFIX = config.ENV_PREFIX
SERVICE_ENV = {
    f"{PREFIX}BROKER_URL": BROKER_URL,
    f"{PREFIX}STATE_URL": STATE_URL,
    f"{PREFIX}CONSUMER_GROUP": f"crash-{RUN}",
    f"{PREFIX}TOPIC_PREFIX": f"crash-{RUN}.",
    f"{PREFIX}BATCH_SIZE": str(BATCH_SIZE),
    f"{PREFIX}HEARTBEAT_FILE": str(OUT / "heartbeat"),
    f"{PREFIX}LOG_LEVEL": "WARNING",
    f"{PREFIX}KAFKA_SESSION_TIMEOUT_MS": "6000",
    f"{PREFIX}KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
    "CRASH_TEST_LOG": str(OUT / "handled.log"),
    "CRASH_HANDLER_DELAY_S": "0.01",
}
settings = config.Settings(
    broker_url=BROKER_URL,
    consumer_group=f"crash-{RUN}-producer",
    topic_prefix=f"crash-{RUN}.",
)
TOPIC = settings.topic_for(envelope.event_type_of(orders.OrderPlaced))
CODEC = envelope.CloudEventsProtobufCodec(envelope.TypeRegistry([orders.OrderPlaced]))


def encode(event_id: str, key: str) -> Any:
    body = CODEC.encode(
        envelope.Envelope(
            id=event_id,
            type=envelope.event_type_of(orders.OrderPlaced),
            source="urn:crash-test",
            payload=orders.OrderPlaced(order_id=event_id, quantity=1),
            subject=key,
        )
    )
    return brokers.OutboundMessage(TOPIC, body, key)


def handled_lines() -> list[tuple[str, int]]:
    """(event id, the key's ctx.state count after it) per handler run, in order."""
    path = OUT / "handled.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(event_id, int(count)) for event_id, count in (line.split() for line in lines)]


def handled() -> list[str]:
    return [event_id for event_id, _ in handled_lines()]


class Service:
    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log = open(OUT / "service.log", "ab")  # noqa: SIM115 - lives as long as the run

    async def start(self) -> float:
        heartbeat = OUT / "heartbeat"
        heartbeat.unlink(missing_ok=True)
        began = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", PACKAGE, "run"],
            env={**os.environ, **SERVICE_ENV},
            stdout=self.log,
            stderr=self.log,
        )
        self.starts += 1
        while not heartbeat.exists():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"service exited with {self.process.returncode}; see service.log"
                )
            await asyncio.sleep(0.05)
        return time.monotonic() - began

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


async def wait_for(condition: Any, deadline_s: float) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if condition():
            return True
        await asyncio.sleep(0.2)
    return condition()


async def main() -> dict[str, Any]:
    rng = random.Random(SEED)
    began = time.monotonic()
    service = Service()
    await service.start()
    producer = brokers.open_broker(settings)
    await producer.start([])

    # Phase 1: a stream with producer duplicates and poison, killed at random moments.
    ids = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(EVENTS)]
    plan = [(event_id, KEYS[n % len(KEYS)]) for n, event_id in enumerate(ids)]
    for _ in range(EVENTS // 10):  # a producer retrying: same id published again soon after
        position = rng.randrange(len(plan))
        plan.insert(min(len(plan), position + rng.randrange(1, 50)), plan[position])
    poison = [b"poison-%d-" % n + os.urandom(8) for n in range(POISON)]
    chunks = [plan[i : i + 150] for i in range(0, len(plan), 150)]
    poison_in: dict[int, list[bytes]] = {}
    for body in poison:
        poison_in.setdefault(rng.randrange(len(chunks)), []).append(body)
    kill_after = sorted(rng.sample(range(1, len(chunks)), min(KILLS, len(chunks) - 1)))
    restart_s: list[float] = []
    for number, chunk in enumerate(chunks):
        messages = [encode(event_id, key) for event_id, key in chunk]
        messages += [brokers.OutboundMessage(TOPIC, body, "") for body in poison_in.get(number, [])]
        await producer.publish(messages)
        if number in kill_after:
            await asyncio.sleep(rng.uniform(0.01, 0.15))  # mostly while a batch is in flight
            service.kill()
            restart_s.append(await service.start())
        else:
            await asyncio.sleep(rng.uniform(0.02, 0.2))
    await wait_for(lambda: set(ids) <= set(handled()), 180)
    after_kills = Counter(handled())

    # Phase 2: duplicates of handled events, then one sentinel per key (same order path).
    duplicates = rng.sample(plan, 200)
    sentinels = [(f"sentinel-{RUN}-{key}", key) for key in KEYS]
    await producer.publish([encode(event_id, key) for event_id, key in duplicates + sentinels])
    await wait_for(lambda: {s for s, _ in sentinels} <= set(handled()), 120)
    final = Counter(handled())
    counted = dict(handled_lines())  # a sentinel's line: its key's count
    distinct_per_key = Counter(key for _, key in {(e, k) for e, k in plan + sentinels})
    wrong_counts = [
        key for sentinel, key in sentinels if counted.get(sentinel) != distinct_per_key[key]
    ]
    exit_code = service.terminate()
    await producer.close()

    parked = await support.read_dead_letters(
        settings.model_copy(update={"consumer_group": f"crash-{RUN}"}),
        TOPIC,
        lambda seen: set(poison) <= {body for body, _ in seen},
        60,
    )
    parked_bodies = {body for body, _ in parked}
    return {
        "broker": BROKER_URL.split(":")[0],
        "state": STATE_URL.split(":")[0],
        "seed": SEED,
        "events": EVENTS,
        "producer_duplicates_during_kills": len(plan) - EVENTS,
        "kills": len(kill_after),
        "batch_size": BATCH_SIZE,
        "missing": len(set(ids) - set(final)),
        "rehandled_at_kills": sum(count - 1 for count in after_kills.values()),
        # In flight at a kill: a batch being made durable and the next one being handled.
        "rehandled_bound": len(kill_after) * 2 * BATCH_SIZE,
        "duplicates_after_recovery": len(duplicates),
        "duplicates_rehandled": sum(final[e] - after_kills[e] for e, _ in duplicates),
        "sentinels_handled": sum(final[s] for s, _ in sentinels),
        "keys_with_wrong_state_count": len(wrong_counts),
        "poison": POISON,
        "poison_parked": len(parked_bodies & set(poison)),
        "parked_total": len(parked),
        "restart_seconds_max": round(max(restart_s, default=0.0), 2),
        "exit_code_on_sigterm": exit_code,
        "elapsed_s": round(time.monotonic() - began, 1),
    }


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    print(json.dumps(asyncio.run(main())))
