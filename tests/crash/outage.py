"""Outage driver: run with a baked service's interpreter, from the service's folder.

    python outage.py PACKAGE OUT_DIR SCENARIO

SCENARIO is `rabbitmq` or `kafka` (the broker is stopped and started again: a RabbitMQ
node of the test's own, or a tansu broker whose topics live in S3, with SQLite state) or
`etcd` (a Kafka service's state in an etcd of the test's own, SIGKILLed and started
again, several short times, under load from a tansu broker of its own). Events, some of them
poison, are published all along, until the last outage is over. It prints one JSON
object of figures on stdout: the service process must live through every outage, handle
every event, park every poison message, and stop cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from common import Events, Modules, Service, handled, wait_for
from servers import PrivateEtcd, PrivateRabbitMQ, PrivateS3, PrivateTansu, Server

PACKAGE, OUT, SCENARIO = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
CHUNK = 40  # events per publish, one publish every PACE_S: load all through the outages
PACE_S = 0.1
MAX_EVENTS = 40_000  # a bound on the load, whatever happens
POISON = 5
# etcd: mostly new keys, so that each batch reads key state from the store (partitions at
# once) while an outage begins, as well as writing its checkpoint.
KEYS = [f"k{n}" for n in range(5000 if SCENARIO == "etcd" else 12)]
# Broker restarts; etcd outages are shorter and more.
OUTAGES = int(os.environ.get("OUTAGE_COUNT", "10" if SCENARIO == "etcd" else "2"))
DOWN_S = float(os.environ.get("OUTAGE_DOWN_S", "1" if SCENARIO == "etcd" else "3"))
SEED = int(os.environ.get("OUTAGE_SEED", str(random.randrange(1 << 30))))
modules = Modules(PACKAGE)


def servers() -> tuple[list[Server], Server, str, str]:
    """Every private server (in start order), the one that fails, the broker and store URLs."""
    if SCENARIO == "rabbitmq":
        rabbitmq = PrivateRabbitMQ(OUT / "rabbitmq")
        return [rabbitmq], rabbitmq, rabbitmq.url, f"sqlite://{OUT / 'state.db'}"
    if SCENARIO == "kafka":
        s3 = PrivateS3(OUT / "s3")
        tansu = PrivateTansu(OUT / "tansu", s3)
        return [s3, tansu], tansu, f"kafka://{tansu.bootstrap}", f"sqlite://{OUT / 'state.db'}"
    if SCENARIO == "etcd":
        etcd, tansu = PrivateEtcd(OUT / "etcd"), PrivateTansu(OUT / "tansu")
        return [etcd, tansu], etcd, f"kafka://{tansu.bootstrap}", etcd.url
    raise SystemExit(f"unknown scenario {SCENARIO!r}: use rabbitmq, kafka or etcd")


async def publish_until_confirmed(producer: Any, messages: list[Any]) -> int:
    """Publish, again and again while the broker is down; returns the attempts it took."""
    attempts = 0
    while True:
        attempts += 1
        try:
            await producer.publish(messages)
            return attempts
        except modules.brokers.BrokerUnavailable:
            await asyncio.sleep(0.5)


async def main(started: list[Server | Service]) -> dict[str, Any]:
    rng = random.Random(SEED)
    began = time.monotonic()
    every, failing, broker_url, state_url = servers()
    for server in every:
        server.start()
        started.append(server)
    run = uuid.uuid4().hex[:8]
    settings = modules.producer_settings(run, broker_url)
    events = Events(modules, settings)
    service = Service(PACKAGE, OUT, modules.service_env(run, OUT, broker_url, state_url))
    started.append(service)
    await service.start()

    async def until(condition: Any, seconds: float) -> None:
        """Wait for `condition`, but not for a service that has ended (the test fails)."""
        process = service.process
        assert process is not None
        await wait_for(lambda: process.poll() is not None or condition(), seconds)

    producer = modules.brokers.open_broker(settings)
    await producer.start([])

    ids: list[str] = []
    poison = [b"poison-%d-" % n + os.urandom(8) for n in range(POISON)]
    republished = 0
    over = asyncio.Event()  # the last outage is over

    async def publish_all() -> None:
        nonlocal republished
        while not over.is_set() and len(ids) < MAX_EVENTS:
            chunk = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(CHUNK)]
            ids.extend(chunk)
            messages = [events.encode(event_id, rng.choice(KEYS)) for event_id in chunk]
            if len(ids) // CHUNK <= POISON:  # early, so that outages hit their parking too
                messages.append(events.poison(poison[len(ids) // CHUNK - 1]))
            republished += await publish_until_confirmed(producer, messages) - 1
            await asyncio.sleep(PACE_S)

    async def outages() -> list[float]:
        """Each outage once the service has handled more since the last one: it resumed."""
        resumed_s = []
        for _ in range(OUTAGES):
            before = len(handled(OUT))
            await until(lambda before=before: len(handled(OUT)) > before + 50, 120)
            failing.stop(kill=SCENARIO == "etcd")
            await asyncio.sleep(DOWN_S)
            failing.start()
            restarted = time.monotonic()
            after = len(handled(OUT))
            await until(lambda after=after: len(handled(OUT)) > after, 120)
            resumed_s.append(round(time.monotonic() - restarted, 2))
        over.set()
        return resumed_s

    publishing = asyncio.ensure_future(publish_all())
    resumed_s = await outages()
    await publishing
    await until(lambda: set(ids) <= set(handled(OUT)), 180)
    counts = Counter(handled(OUT))
    alive = service.process is not None and service.process.poll() is None
    exit_code = service.terminate() if alive else service.process.returncode
    if not alive:  # what ended it, for the test's message
        print(service.log_tail(), file=sys.stderr)
    await producer.close()

    parked = await modules.support(broker_url).read_dead_letters(
        settings.model_copy(update={"consumer_group": f"crash-{run}"}),
        events.topic,
        lambda seen: set(poison) <= {body for body, _ in seen},
        60,
    )
    return {
        "scenario": SCENARIO,
        "seed": SEED,
        "events": len(ids),
        "outages": len(resumed_s),
        "down_s": DOWN_S,
        "service_starts": service.starts,
        "alive_after_outages": alive,
        "missing": len(set(ids) - set(counts)),
        "rehandled": sum(count - 1 for count in counts.values()),
        "publishes_retried": republished,
        "poison": POISON,
        "poison_parked": len({body for body, _ in parked} & set(poison)),
        "resumed_after_restart_s": resumed_s,
        # The outages were felt: steps the service retried while a server was down, and
        # reconnects of a RabbitMQ connection (it may have had nothing to retry).
        "retried_steps": service.log_tail(10**9).count("failed; retrying"),
        "reconnects": service.log_tail(10**9).count("reconnected; dropped deliveries"),
        "exit_code_on_sigterm": exit_code,
        "elapsed_s": round(time.monotonic() - began, 1),
    }


def run() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    started: list[Server | Service] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the servers all the same
    try:
        print(json.dumps(asyncio.run(main(started))))
    finally:
        for process in reversed(started):  # the service first, if it still runs
            if isinstance(process, Service):
                if process.process is not None and process.process.poll() is None:
                    process.kill()
            else:
                process.stop(kill=True)


if __name__ == "__main__":
    run()
