"""Instructions per event of the service's loop, by handler shape: a figure this
machine's noise cannot move (rates and CPU time drift up to 2x between identical runs
here, instruction counts by well under 1 %). Run with a baked service's interpreter,
from its folder, like throughput.py:

    python instructions.py PACKAGE [--shapes noop,stateful] [--events 2000,10000]
                                   [--state memory|etcd] [--counter valgrind|cpu]

For each handler shape (bench/contestants/ours.py) the loop runs in a child process over
the memory bus (exclusive streams, as Kafka partitions), once per count of --events,
under valgrind's cachegrind (no cache simulation). The difference of the instructions
counted, divided by the difference of the events, is what one more event costs:
starting, importing and building fall out. The events are the benchmark's own (same ids,
keys and duplicates), made beforehand by this process, in whole batches. Groups close
when full (COMMIT_INTERVAL_MS is long): valgrind runs the loop ~50x slower, and a 100 ms
interval would make each batch its own group, which at full speed it is not.

Prints each shape's instructions per event and its ratio to the no-op's (the stateful /
no-op ratio is a target of issue 21). `--counter cpu` counts process CPU time instead
(no valgrind; as noisy as the throughput runs). Emitted events go to the memory bus:
the emitting shapes' counts leave out a real broker's client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from contestants.common import BATCH, Bench, events, feeds
from contestants.ours import prepare, router_for, start_like_the_service

GROUP = "instructions"
REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def parse_refs(valgrind_output: str) -> int:
    """The instructions cachegrind counted, from its summary line."""
    found = REFS.search(valgrind_output)
    if found is None:
        raise SystemExit(f"no instruction count in valgrind's output:\n{valgrind_output[-2000:]}")
    return int(found.group(1).replace(",", ""))


def child(bench: Bench, shape: str, data: Path, count: int, state: str) -> None:
    """Run the loop over `count` events of `data` until every one is acked."""
    memory = bench.module("runtime.brokers.memory")
    base = bench.module("runtime.brokers.base")
    config, app = bench.module("runtime.config"), bench.module("runtime.app")
    router = router_for(bench, shape)
    overrides = prepare(bench, f"instructions-{time.time_ns()}", state)  # as throughput.py
    # Valgrind slows the etcd client ~50x: no call may time out and retry (uncounted work).
    os.environ[f"{config.ENV_PREFIX}ETCD_TIMEOUT_S"] = "300"
    settings = config.Settings(
        broker_url="memory://",
        consumer_group=GROUP,
        commit_interval_ms=3_600_000,
        drain_timeout_s=3_600,
        log_level="WARNING",
        **overrides,
    )
    bus = memory.MemoryBus()
    topics = [settings.topic_for(event_type) for event_type in router.event_types()]
    bus.bind(GROUP, topics)
    event_type, messages = pickle.loads(data.read_bytes())
    headers = {base.CONTENT_TYPE_HEADER: "application/cloudevents+protobuf"}
    for body, key in messages[:count]:
        bus.put(base.OutboundMessage(settings.topic_for(event_type), body, key, headers))
    broker = memory.MemoryBroker(bus, GROUP, exclusive=True)
    loop = app.build_loop(settings, router, broker=broker)
    start_like_the_service(bench, settings)

    async def run() -> None:
        stop = asyncio.Event()
        started = time.process_time()
        running = asyncio.create_task(loop.run(stop))
        while bus.queue(GROUP).ready and not running.done():
            await asyncio.sleep(0.05)  # seldom: polling costs instructions too
        stop.set()  # every event is delivered: stopping drains, writing the last group
        await running
        print(f"cpu_s={time.process_time() - started}")
        if bus.pending(GROUP):
            raise SystemExit(f"{bus.pending(GROUP)} events were not acked")

    asyncio.run(run())


def measure(args: argparse.Namespace, shape: str, data: Path, count: int) -> float:
    """Instructions (valgrind) or CPU seconds (cpu) of one child run."""
    command = [sys.executable, __file__, args.package, "--child", shape, "--data", str(data)]
    command += ["--count", str(count), "--state", args.state]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    if args.counter == "valgrind":
        valgrind = ["valgrind", "--tool=cachegrind", "--cache-sim=no"]
        command = [*valgrind, "--cachegrind-out-file=/dev/null", *command]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{shape} ({count} events) failed:\n{done.stderr[-3000:]}")
    if args.counter == "valgrind":
        return parse_refs(done.stderr)
    return float(done.stdout.rsplit("cpu_s=", 1)[1].split()[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("package")
    parser.add_argument("--shapes", default="noop,stateful")
    parser.add_argument("--events", default="2000,10000", help="two counts: SMALL,LARGE")
    parser.add_argument("--state", choices=["memory", "etcd"], default="memory")
    parser.add_argument("--counter", choices=["valgrind", "cpu"], default="valgrind")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here too")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    bench = Bench(args.package, "kafka", latency_rate=0)
    if args.child is not None:
        child(bench, args.child, args.data, args.count, args.state)
        return
    try:
        small, large = (int(count) for count in args.events.split(","))
    except ValueError:
        raise SystemExit(f"--events: two counts, SMALL,LARGE (got {args.events!r})") from None
    if not 0 < small < large or small % BATCH or large % BATCH:
        # Whole batches: a batch short of full waits out the (long) commit interval.
        raise SystemExit(f"--events: 0 < SMALL < LARGE, multiples of {BATCH} (got {args.events})")
    if args.counter == "valgrind" and shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed: apt-get install valgrind (or --counter cpu)")
    shapes = args.shapes.split(",")
    unit = "instructions" if args.counter == "valgrind" else "CPU µs"
    per_event: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        for shape in shapes:
            feed = feeds(bench)["orders" if shape == "sample" else "text"]
            data = Path(folder) / f"{feed.name}.pickle"
            if not data.exists():
                data.write_bytes(pickle.dumps((feed.event_type, events(bench, feed, large))))
            counted = [measure(args, shape, data, count) for count in (small, large)]
            per_event[shape] = (counted[1] - counted[0]) / (large - small)
            if args.counter == "cpu":
                per_event[shape] *= 1e6
            print(f"{shape:10} {per_event[shape]:12,.1f} {unit} per event", flush=True)
    ratios = {}
    if "noop" in per_event:  # as throughput.py's ratios: the shape's rate over the no-op's
        for shape, cost in per_event.items():
            if shape != "noop":
                ratios[f"{shape} / noop"] = per_event["noop"] / cost
                print(f"{shape} / no-op: {ratios[f'{shape} / noop']:.3f} (no-op's {unit} / its)")
    if args.json is not None:
        figures = {"counter": args.counter, "unit": unit, "state": args.state}
        figures |= {"events": [small, large], "per_event": per_event, "ratios": ratios}
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
