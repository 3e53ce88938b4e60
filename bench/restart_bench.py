"""Restart-to-first-handled after SIGKILL, on the Kafka broker in TEST_KAFKA_BOOTSTRAP.

    python restart_bench.py PACKAGE OUT_DIR [--restarts N]

Run with a baked Kafka service's interpreter from its folder (bench/restart.sh does it).
Per membership (dynamic, then static with KAFKA_GROUP_INSTANCE_ID set): start the
service, let it handle an event, SIGKILL it, publish one more event, start it again and
time from the new process's start until its handler ran that event. The group settings
are the service's defaults. Prints one JSON object: each time and the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "crash"))
from common import Events, Modules, Service, handled, wait_for


async def one_membership(package: str, out: Path, restarts: int, static: bool) -> list[float]:
    modules = Modules(package)
    run = uuid.uuid4().hex[:8]
    broker_url = f"kafka://{os.environ['TEST_KAFKA_BOOTSTRAP']}"
    out.mkdir(parents=True, exist_ok=True)
    env = modules.service_env(run, out, broker_url, f"sqlite://{out / 'state.db'}")
    prefix = modules.config.ENV_PREFIX
    for name in ("KAFKA_SESSION_TIMEOUT_MS", "KAFKA_HEARTBEAT_INTERVAL_MS"):
        del env[prefix + name]  # the defaults, as shipped
    if static:
        env[f"{prefix}KAFKA_GROUP_INSTANCE_ID"] = f"bench-{run}"
    settings = modules.config.Settings(
        broker_url=broker_url, consumer_group=f"crash-{run}-producer", topic_prefix=f"crash-{run}."
    )
    events = Events(modules, settings)
    producer = modules.brokers.open_broker(settings)
    await producer.start([])
    service = Service(package, out, env)
    await service.start()
    times: list[float] = []
    try:
        for number in range(restarts + 1):
            event_id = f"{run}-{number}"
            if number:
                service.kill()
            await producer.publish([events.encode(event_id, "k")])
            began = time.monotonic()
            if number:
                await service.start()
            if not await wait_for(lambda event_id=event_id: event_id in handled(out), 120):
                raise RuntimeError(f"{event_id} not handled within 120 s; see {out}/service.log")
            if number:  # the first start only joins the group and creates the topics
                times.append(round(time.monotonic() - began, 2))
    finally:
        service.kill()
        await producer.close()
    return times


async def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("package")
    parser.add_argument("out", type=Path)
    parser.add_argument("--restarts", type=int, default=5)
    arguments = parser.parse_args()
    figures: dict[str, Any] = {"broker": os.environ["TEST_KAFKA_BOOTSTRAP"]}
    for membership in ("dynamic", "static"):
        times = await one_membership(
            arguments.package,
            arguments.out / membership,
            arguments.restarts,
            membership == "static",
        )
        figures[membership] = {"seconds": times, "median_s": statistics.median(times)}
    return figures


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
