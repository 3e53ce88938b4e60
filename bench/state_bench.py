"""State-store benchmark: run with a baked service's interpreter, from its folder.

    python state_bench.py PACKAGE [--ids 1000000] [--seconds 4]

Prints, measured in this one run:
- store writes per second against the message rate (the loop on the memory bus, state in
  etcd at TEST_ETCD_ENDPOINTS): group commit keeps writes bounded as the rate grows;
- bytes of memory per remembered dedupe id (the in-memory window);
- time to restore a window of --ids ids from etcd and from SQLite.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import os
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

parser = argparse.ArgumentParser()
parser.add_argument("package")
parser.add_argument("--ids", type=int, default=1_000_000)
parser.add_argument("--seconds", type=float, default=4.0)
parser.add_argument("--json", type=Path, default=None)
args = parser.parse_args()

runtime = importlib.import_module(f"{args.package}.runtime")
config = importlib.import_module(f"{args.package}.runtime.config")
testing = importlib.import_module(f"{args.package}.runtime.testing")
state_module = importlib.import_module(f"{args.package}.runtime.state")
dedupe = importlib.import_module(f"{args.package}.runtime.dedupe")
app = importlib.import_module(f"{args.package}.runtime.app")
brokers = importlib.import_module(f"{args.package}.runtime.brokers")
wrappers = importlib.import_module("google.protobuf.wrappers_pb2")

ETCD = os.environ.get("TEST_ETCD_ENDPOINTS")
if not ETCD:
    sys.exit("set TEST_ETCD_ENDPOINTS=host:port (bash scripts/servers.sh start)")


class CountingStore:
    """Wraps a store and counts its commits (one etcd transaction each, for small batches)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.commits = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def commit(self, checkpoint: Any) -> None:
        self.commits += 1
        await self.inner.commit(checkpoint)


async def write_rate(rate: int) -> dict[str, float]:
    """Offer `rate` msg/s for --seconds to the loop; count store writes meanwhile."""
    router = runtime.Router()

    @router.handles(wrappers.StringValue)
    async def noop(event: Any, ctx: Any) -> None:
        return None

    group = f"bench-{uuid.uuid4().hex[:8]}"
    service = testing.ServiceHarness(
        router, state_url=f"etcd://{ETCD}", consumer_group=group, commit_interval_ms=100
    )
    store = CountingStore(service.state)
    loop = app.build_loop(
        service.settings,
        router,
        broker=brokers.MemoryBroker(service.bus, group),
        state=store,  # type: ignore[arg-type]
    )
    stop = asyncio.Event()
    running = asyncio.create_task(loop.run(stop))
    began = time.monotonic()
    sent = 0
    while (elapsed := time.monotonic() - began) < args.seconds:
        while sent < int(elapsed * rate):
            await service.publish(wrappers.StringValue(value="x"))
            sent += 1
        await asyncio.sleep(0.005)
    while service.bus.pending(group):
        await asyncio.sleep(0.01)
    elapsed = time.monotonic() - began
    stop.set()
    stats = await running
    return {
        "offered_msg_per_s": rate,
        "handled_msg_per_s": round(stats.handled / elapsed),
        "store_writes_per_s": round(store.commits / elapsed, 1),
        "messages_per_write": round(stats.handled / max(store.commits, 1), 1),
    }


def bytes_per_id(count: int) -> float:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    window = dedupe.DedupeWindow(count, 3600)
    now = time.time()
    window.add(((str(uuid.UUID(int=n)), now) for n in range(count)), now)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(window) == count
    return used / count


async def restore_seconds(url: str, count: int) -> dict[str, float]:
    group = f"bench-{uuid.uuid4().hex[:8]}"
    settings = config.Settings(
        state_url=url, consumer_group=group, dedupe_max_ids=count, dedupe_ttl_s=3600
    )
    store = state_module.open_state_store(settings)
    await store.open()
    written = time.perf_counter()
    now = time.time()
    batch = 5000
    for start in range(0, count, batch):
        ids = [str(uuid.UUID(int=n)) for n in range(start, start + batch)]
        await store.commit(state_module.Checkpoint("s", ids, now))
    write_s = time.perf_counter() - written
    await store.close()

    fresh = state_module.open_state_store(settings)  # a restarted process
    await fresh.open()
    began = time.perf_counter()
    loaded = await fresh.load("s")
    window = dedupe.DedupeWindow(count, 3600)
    window.add(loaded.records, time.time())
    restore_s = time.perf_counter() - began
    await fresh.close()
    assert len(window) == count, len(window)
    return {"ids": count, "restore_s": round(restore_s, 2), "write_s": round(write_s, 1)}


async def main() -> dict[str, Any]:
    rates = [await write_rate(rate) for rate in (100, 1_000, 5_000, 20_000)]
    with tempfile.TemporaryDirectory() as folder:
        sqlite = await restore_seconds(f"sqlite://{folder}/state.db", args.ids)
    etcd = await restore_seconds(f"etcd://{ETCD}", args.ids)
    return {
        "write_rate": rates,
        "bytes_per_remembered_id": round(bytes_per_id(args.ids)),
        "restore_sqlite": sqlite,
        "restore_etcd": etcd,
    }


if __name__ == "__main__":
    config_logging = importlib.import_module(f"{args.package}.runtime.logs")
    config_logging.configure_logging(config.Settings(log_level="ERROR"))
    figures = asyncio.run(main())
    print("store writes against message rate (memory bus, etcd state, COMMIT_INTERVAL_MS=100):")
    print(f"  {'offered msg/s':>14} {'handled msg/s':>14} {'writes/s':>9} {'msgs/write':>11}")
    for row in figures["write_rate"]:
        print(
            f"  {row['offered_msg_per_s']:>14} {row['handled_msg_per_s']:>14} "
            f"{row['store_writes_per_s']:>9} {row['messages_per_write']:>11}"
        )
    print(f"memory per remembered dedupe id: {figures['bytes_per_remembered_id']} bytes")
    for name in ("restore_sqlite", "restore_etcd"):
        row = figures[name]
        print(f"{name}: {row['ids']} ids restored in {row['restore_s']} s", end=" ")
        print(f"(written in {row['write_s']} s)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
