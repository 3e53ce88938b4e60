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
import json
import os
import random
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from common import Events, Modules, Service, handled, handled_lines, wait_for

PACKAGE, OUT = sys.argv[1], Path(sys.argv[2])
EVENTS = int(os.environ.get("CRASH_EVENTS", "3000"))
KILLS = int(os.environ.get("CRASH_KILLS", "5"))
BATCH_SIZE = int(os.environ.get("CRASH_BATCH_SIZE", "100"))
POISON = 20
KEYS = [f"k{n}" for n in range(12)]
SEED = int(os.environ.get("CRASH_SEED", str(random.randrange(1 << 30))))

modules = Modules(PACKAGE)
if os.environ.get("TEST_KAFKA_BOOTSTRAP"):
    BROKER_URL = f"kafka://{os.environ['TEST_KAFKA_BOOTSTRAP']}"
else:
    BROKER_URL = os.environ["TEST_AMQP_URL"]
support = modules.support(BROKER_URL)

if os.environ.get("CRASH_STATE", "sqlite") == "etcd":
    STATE_URL = f"etcd://{os.environ['TEST_ETCD_ENDPOINTS']}"
else:
    STATE_URL = f"sqlite://{OUT / 'state.db'}"

RUN = uuid.uuid4().hex[:8]
settings = modules.producer_settings(RUN, BROKER_URL)
events = Events(modules, settings)
TOPIC = events.topic


async def main() -> dict[str, Any]:
    rng = random.Random(SEED)
    began = time.monotonic()
    service = Service(PACKAGE, OUT, modules.service_env(RUN, OUT, BROKER_URL, STATE_URL))
    await service.start()
    producer = modules.brokers.open_broker(settings)
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
        messages = [events.encode(event_id, key) for event_id, key in chunk]
        messages += [events.poison(body) for body in poison_in.get(number, [])]
        await producer.publish(messages)
        if number in kill_after:
            await asyncio.sleep(rng.uniform(0.01, 0.15))  # mostly while a batch is in flight
            service.kill()
            restart_s.append(await service.start())
        else:
            await asyncio.sleep(rng.uniform(0.02, 0.2))
    await wait_for(lambda: set(ids) <= set(handled(OUT)), 180)
    after_kills = Counter(handled(OUT))

    # Phase 2: duplicates of handled events, then one sentinel per key (same order path).
    duplicates = rng.sample(plan, 200)
    sentinels = [(f"sentinel-{RUN}-{key}", key) for key in KEYS]
    await producer.publish([events.encode(e, k) for e, k in duplicates + sentinels])
    await wait_for(lambda: {s for s, _ in sentinels} <= set(handled(OUT)), 120)
    final = Counter(handled(OUT))
    counted = dict(handled_lines(OUT))  # a sentinel's line: its key's count
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
