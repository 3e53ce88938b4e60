"""Decode + dedupe step (runtime/intake.py) per message: run with a baked service's
interpreter, from its folder.   python sort_bench.py PACKAGE [--batch 500] [--rounds 15]

Times Intake.decode_and_dedupe over one batch of fresh events (every id new, so each is
decoded, digested, looked up and grouped), best of --rounds repeats of 200 batches, in
CPU (process time) ns per message."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import time

parser = argparse.ArgumentParser()
parser.add_argument("package")
parser.add_argument("--batch", type=int, default=500)
parser.add_argument("--rounds", type=int, default=15)
args = parser.parse_args()

app = importlib.import_module(f"{args.package}.runtime.app")
reaction_module = importlib.import_module(f"{args.package}.runtime.reaction")
brokers = importlib.import_module(f"{args.package}.runtime.brokers")
base = importlib.import_module(f"{args.package}.runtime.brokers.base")
config = importlib.import_module(f"{args.package}.runtime.config")
envelope_module = importlib.import_module(f"{args.package}.runtime.envelope")
handlers = importlib.import_module(f"{args.package}.handlers")


async def main() -> None:
    settings = config.Settings(broker_url="memory://sort-bench", state_url="memory://")
    router = handlers.router
    loop = app.build_loop(settings, router)
    codec = envelope_module.CloudEventsProtobufCodec(app.event_registry(router))
    event_type = router.event_types()[0]
    message_type = app.event_registry(router).get(event_type)
    await loop.state.open()
    await loop.streams.restore({"s"})
    batches = []
    for b in range(200):
        batch = []
        for i in range(args.batch):
            envelope = envelope_module.Envelope(
                f"{b}-{i}-id", event_type, "urn:bench", message_type(), subject=f"k{i % 50}"
            )
            wire = base.event_message(codec, envelope, event_type)
            batch.append(
                base.InboundMessage(
                    wire.body, event_type, "s", b * args.batch + i, wire.key, dict(wire.headers)
                )
            )
        batches.append(batch)
    best = float("inf")
    for _ in range(args.rounds):
        started = time.process_time()
        for batch in batches:
            loop.intake.decode_and_dedupe(batch, loop.streams, reaction_module.Reaction())
        best = min(best, time.process_time() - started)
    print(
        f"decode_and_dedupe: {best / (200 * args.batch) * 1e9:.0f} ns per message "
        f"(best of {args.rounds})"
    )


asyncio.run(main())
