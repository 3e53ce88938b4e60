"""The archiver against the service's own no-op loop on the same Kafka broker and the same
events, and what the archive costs and gives back: run with a baked (Kafka) service's
interpreter, from its folder (bench/archive.sh does both).

    python archive_bench.py PACKAGE [--events 20000] [--payload 1000]

1. N events (a `StringValue` of --payload random base64 characters, incompressible
   but for base64's 3/4, in the envelope, 1,000 keys) are
   published once to a topic of this run (3 partitions) on TEST_KAFKA_BOOTSTRAP.
2. `noop`: the loop with a no-op handler (memory state) consumes them in a fresh group;
   `archive`: the archiver in another (a local folder; ARCHIVE_FILE_MAX_BYTES is
   --file-mib, 64 MiB as shipped).
   Each is timed from its first delivery until it stopped with everything acked (the
   stop is requested once all N arrived: both then write and ack what they hold).
3. Bytes stored per event: the Parquet files' total size / N.
4. Replay rate: `replay --from-archive --to-topic` of all N, as the operator runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from google.protobuf import wrappers_pb2

parser = argparse.ArgumentParser()
parser.add_argument("package")
parser.add_argument("--events", type=int, default=20_000)
parser.add_argument("--payload", type=int, default=1_000)
parser.add_argument("--file-mib", type=int, default=64, help="ARCHIVE_FILE_MAX_BYTES, MiB")
args = parser.parse_args()


def module(name: str) -> Any:
    return importlib.import_module(f"{args.package}.runtime.{name}")


config, app, base, envelope = (
    module("config"),
    module("app"),
    module("brokers.base"),
    module("envelope"),
)
sink, objectstore, cli = module("archive.sink"), module("objectstore"), module("cli")
KAFKA = os.environ["TEST_KAFKA_BOOTSTRAP"]
RUN = uuid.uuid4().hex[:8]
EVENT_TYPE = "google.protobuf.StringValue"


def settings(group: str, **overrides: Any) -> Any:
    return config.Settings(
        broker_url=f"kafka://{KAFKA}",
        state_url="memory://",
        consumer_group=f"bench-archive-{RUN}-{group}",
        topic_prefix=f"bench-archive-{RUN}.",
        **overrides,
    )


def random_text(size: int) -> str:
    return base64.b64encode(os.urandom(size))[:size].decode()


async def publish_events() -> None:
    codec = envelope.CloudEventsProtobufCodec(app.event_registry())
    codec.registry.add(wrappers_pb2.StringValue)
    broker = app.open_broker(settings("producer"))
    await broker.start([])
    topic = settings("producer").topic_for(EVENT_TYPE)
    for start in range(0, args.events, 1_000):
        messages = [
            base.event_message(
                codec,
                envelope.Envelope(
                    envelope.new_event_id(),
                    EVENT_TYPE,
                    "urn:bench",
                    wrappers_pb2.StringValue(value=random_text(args.payload)),
                    f"k{number % 1000}",
                    envelope.now(),
                ),
                topic,
            )
            for number in range(start, min(start + 1_000, args.events))
        ]
        await broker.publish(messages)
    await broker.close()


async def timed(loop: Any) -> float:
    """Seconds from the loop's first delivery until it stopped with all N acked."""
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    while loop.stats.received == 0:
        await asyncio.sleep(0.001)
    began = time.perf_counter()
    while loop.stats.received < args.events:
        await asyncio.sleep(0.001)
    stop.set()
    stats = await task
    assert stats.acked >= args.events, stats
    return time.perf_counter() - began


def noop_loop() -> Any:
    router = module("router").Router()

    @router.handles(wrappers_pb2.StringValue)
    async def noop(event: Any, ctx: Any) -> None:
        return None

    return app.build_loop(settings("noop"), router)


def archive_loop(folder: Path) -> Any:
    archive = sink.ArchiveSettings(
        archive_group=f"bench-archive-{RUN}-archive",
        archive_file_max_bytes=args.file_mib * 1024 * 1024,
        archive_writer="bench",
    )
    store = objectstore.open_object_store(
        objectstore.ObjectStoreSettings(archive_url=folder.as_uri())
    )
    return sink.build_archiver(settings("archive"), archive, store)


def replay_rate(folder: Path) -> dict[str, Any]:
    os.environ[f"{config.ENV_PREFIX}ARCHIVE_URL"] = folder.as_uri()
    parsed = cli._parser().parse_args(
        ["replay", "--from-archive", "--to-topic", f"bench-archive-{RUN}.copies", "--json"]
    )
    from contextlib import redirect_stdout
    from io import StringIO

    out = StringIO()
    with redirect_stdout(out):
        asyncio.run(cli.OPERATOR_COMMANDS["replay"].run(settings("replay"), parsed))
    summary: dict[str, Any] = json.loads(out.getvalue().splitlines()[-1])["summary"]
    return summary


def main() -> None:
    asyncio.run(publish_events())
    noop_s = asyncio.run(timed(noop_loop()))
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        archive_s = asyncio.run(timed(archive_loop(folder)))
        files = list(folder.rglob("*.parquet"))
        stored = sum(path.stat().st_size for path in files)
        replay = replay_rate(folder)
    noop_rate, archive_rate = args.events / noop_s, args.events / archive_s
    print(
        json.dumps(
            {
                "events": args.events,
                "payload_bytes": args.payload,
                "noop_loop_per_s": round(noop_rate),
                "archive_per_s": round(archive_rate),
                "archive_vs_noop": round(archive_rate / noop_rate, 2),
                "files": len(files),
                "bytes_per_event": round(stored / args.events, 1),
                "replay_per_s": replay["per_second"],
                "replayed": replay["republished"],
            },
            indent=1,
        )
    )


main()
