"""Per-message cost of tracing: run with a baked service's interpreter, from its folder.

    python tracing_bench.py PACKAGE [--events 20000] [--rounds 3]

Runs the real loop (memory bus, memory state, no-op handler that emits one event) over
the same events with tracing off (no SDK), on and sampled (every span recorded and
exported to a no-op exporter), and on but not sampled (1% ratio and 0%), alternating
modes each round, and prints microseconds per message and the ratio to tracing off.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import statistics
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

parser = argparse.ArgumentParser()
parser.add_argument("package")
parser.add_argument("--events", type=int, default=20_000)
parser.add_argument("--rounds", type=int, default=3)
args = parser.parse_args()

runtime = importlib.import_module(f"{args.package}.runtime")
app = importlib.import_module(f"{args.package}.runtime.app")
brokers = importlib.import_module(f"{args.package}.runtime.brokers")
testing = importlib.import_module(f"{args.package}.runtime.testing")
logs = importlib.import_module(f"{args.package}.runtime.logs")
config = importlib.import_module(f"{args.package}.runtime.config")
telemetry = importlib.import_module(f"{args.package}.runtime.telemetry")
wrappers = importlib.import_module("google.protobuf.wrappers_pb2")


class DiscardingExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def provider(ratio: float | None) -> TracerProvider | None:
    if ratio is None:
        return None
    # As the service makes it with OTEL_TRACES_SAMPLER=parentbased_traceidratio.
    chosen: TracerProvider = telemetry.tracer_provider(
        sampler=ParentBased(TraceIdRatioBased(ratio))
    )
    chosen.add_span_processor(BatchSpanProcessor(DiscardingExporter(), max_queue_size=65536))
    return chosen


MODES: dict[str, TracerProvider | None] = {
    "off": None,
    "on, sampled (100%)": provider(1.0),
    "on, sampled at 1%": provider(0.01),
    "on, not sampled (0%)": provider(0.0),
}


async def run_once(tracer_provider: Any) -> float:
    router = runtime.Router()

    @router.handles(wrappers.StringValue)
    async def react(event: Any, ctx: Any) -> None:
        ctx.emit(wrappers.Int64Value(value=1))

    service = testing.ServiceHarness(router, batch_size=500, commit_interval_ms=0)
    for n in range(args.events):
        await service.publish(wrappers.StringValue(value=str(n)), key=f"k{n % 50}")
    loop = app.build_loop(
        service.settings,
        router,
        broker=brokers.MemoryBroker(service.bus, service.group),
        state=service.state,
        tracer_provider=tracer_provider,
    )
    stop = asyncio.Event()
    began = time.perf_counter()
    running = asyncio.create_task(loop.run(stop))
    while service.bus.pending(service.group):
        await asyncio.sleep(0.001)
    elapsed = time.perf_counter() - began
    stop.set()
    await running
    return elapsed / args.events * 1e6


async def main() -> dict[str, float]:
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode, chosen in MODES.items():
            samples[mode].append(await run_once(chosen))
    return {mode: statistics.median(values) for mode, values in samples.items()}


if __name__ == "__main__":
    logs.configure_logging(config.Settings(log_level="ERROR"))
    results = asyncio.run(main())
    base = results["off"]
    print(f"per-message cost of the loop, median of {args.rounds} rounds of {args.events} events")
    for mode, micros in results.items():
        print(f"  {mode:<22} {micros:7.1f} us/msg   {micros / base:5.2f}x tracing off")
