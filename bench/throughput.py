"""Throughput against peers, on one broker, same data, same run. Run with a baked
service's interpreter (FastStream installed beside it), from its folder:

    python throughput.py PACKAGE kafka|rabbitmq [--events 100000] [--json FILE]

Pre-loads --events envelopes (1 KB payloads, 5 % producer duplicates, 1000 keys) once,
then runs each contestant in its own process over the same data (Kafka: a fresh consumer
group on one 3-partition topic; RabbitMQ: its own quorum queue, filled by the same
publishes), timing from its first message to its last acknowledgement. Every contestant
runs --rounds times (fresh group or freshly filled queue each round); the best round
counts, since noise on a shared machine only ever slows a run down. The contestants
(bench/contestants/):

- ours: the generated service's loop with a no-op handler (memory state; etcd state;
  etcd state with tracing sampled at 1 %), and, etcd state, a handler that emits one
  event per event (`ctx.emit`), one that keeps per-key state (`ctx.state`, no emit),
  and the sample handler as baked (state + emit; it reads OrderPlaced events of the
  same size, ids and keys);
- bare: the client library alone, a batch loop (aiokafka getmany + one commit per
  batch; aio-pika with one multiple-ack per batch): the practical ceiling; and a relay
  (consume -> produce one event per message, acks=all / publisher confirms -> wait ->
  commit / multiple-ack);
- FastStream with AckPolicy.ACK (ack after processing) and ACK_FIRST (at-most-once), and
  a relay (`@subscriber` + `@publisher`, ACK) over at most --slow-events messages.

Then, for ours: p50/p99 publish-to-ack latency at a steady offered rate (no-op handler
and the sample handler), etcd transactions against messages per second, and each
process's peak RSS. Prints a table, the ratios ours/peer against the targets, and
writes everything as JSON with --json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

from contestants import LATENCY, latency, table
from contestants.common import (
    BATCH,
    DEADLINE_S,
    DUPLICATE_SHARE,
    KEYS,
    PAYLOAD_BYTES,
    Bench,
    drop_rabbitmq_queues,
    events,
    load_kafka,
    load_rabbitmq,
)

parser = argparse.ArgumentParser()
parser.add_argument("package")
parser.add_argument("broker", choices=["kafka", "rabbitmq"])
parser.add_argument("--events", type=int, default=100_000)
parser.add_argument(
    "--slow-events",
    type=int,
    default=30_000,
    help="at most this many for contestants that run at a few hundred msg/s",
)
parser.add_argument("--json", type=Path, default=None)
parser.add_argument("--latency-rate", type=int, default=2000, help="msg/s for the latency runs")
parser.add_argument("--latency-seconds", type=float, default=5.0, help="length of each latency run")
parser.add_argument("--rounds", type=int, default=5, help="runs per contestant; the best counts")
parser.add_argument(
    "--only", default=None, help="comma-separated contestants to run (ratios of those only)"
)
parser.add_argument(
    "--profile",
    type=Path,
    default=None,
    help="record each contestant with py-spy (on PATH) into this folder, as collapsed stacks",
)
parser.add_argument("--contestant", default=None, help=argparse.SUPPRESS)  # child process
parser.add_argument("--run", default=None, help=argparse.SUPPRESS)
parser.add_argument("--label", default=None, help=argparse.SUPPRESS)  # group / queue suffix
args = parser.parse_args()
bench = Bench(args.package, args.broker, args.latency_rate, args.latency_seconds)


def child(run: str, name: str, label: str) -> None:
    result: dict[str, Any]
    if name in LATENCY:
        result = asyncio.run(latency(bench, run, name))
    else:
        contestant = table(bench)[name]
        total = min(args.events, args.slow_events) if contestant.slow else args.events
        result = asyncio.run(contestant.start(run, label, total))
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

# (ours, peer, ratio at least). The no-op handler is ours-etcd-state; the emitting handler
# is the one compared with the relays.
TARGETS = {
    "kafka": [
        ("ours-etcd-state", "faststream-ack", 15.0),
        ("ours-etcd-state", "faststream-ack-first", 1.5),
        ("ours-etcd-state", "bare-aiokafka-batch", 0.6),
        ("ours-etcd-emit-one", "bare-aiokafka-relay", 0.5),
        ("ours-etcd-stateful", "ours-etcd-state", 0.7),
        ("ours-etcd-sample", "bare-aiokafka-relay", 0.4),
        ("ours-etcd-emit-one", "faststream-relay-ack", 20.0),
    ],
    "rabbitmq": [
        ("ours-etcd-state", "faststream-ack", 1.5),
        ("ours-etcd-state", "bare-aio-pika-multiple-ack", 0.8),
        ("ours-etcd-emit-one", "bare-aio-pika-relay", 0.6),
        ("ours-etcd-stateful", "ours-etcd-state", 0.7),
        ("ours-etcd-emit-one", "faststream-relay-ack", 2.0),
    ],
}
# (latency run, figure, at most): the sample service's publish-to-ack p99, both brokers.
LATENCY_TARGETS = [("latency-sample", "p99_ms", 200.0)]


def run_child(run: str, name: str, label: str) -> dict[str, Any]:
    command = [sys.executable, __file__, args.package, args.broker, "--events", str(args.events)]
    command += ["--slow-events", str(args.slow_events)]
    command += ["--latency-rate", str(args.latency_rate), "--latency-seconds"]
    command += [str(args.latency_seconds), "--contestant", name, "--run", run]
    command += ["--label", label, "--rounds", str(args.rounds)]
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        record = ["py-spy", "record", "--rate", "250", "--format", "raw", "--nonblocking"]
        command = [*record, "-o", str(args.profile / f"{label}.txt"), "--", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE_S + 60)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    # The last JSON line: py-spy, when profiling, writes its own lines after it.
    last = [line for line in done.stdout.splitlines() if line.startswith("{")][-1]
    result: dict[str, Any] = json.loads(last)
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
    contestants = table(bench)
    names = list(contestants)
    if args.only is not None:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise SystemExit(f"unknown contestants {unknown}: choose from {names}")
        names = [name for name in names if name in wanted]
    print(
        f"{args.events} events ({PAYLOAD_BYTES} B payloads, {DUPLICATE_SHARE:.0%} duplicates,"
        f" {KEYS} keys) on {args.broker}, {args.rounds} rounds",
        file=sys.stderr,
    )
    used = {contestants[name].feed for name in names}
    data = {feed: events(bench, feed, args.events) for feed in used}
    results: dict[str, dict[str, Any]] = {}
    rounds: list[dict[str, float]] = []  # each round's rates: ratios within one round
    for round_number in range(1, args.rounds + 1):
        # Kafka: one topic per feed, a new consumer group per contestant and round.
        # RabbitMQ: a queue per contestant and round, filled by the same publishes.
        labels = [f"{name}-r{round_number}" for name in names]
        began = time.perf_counter()
        if args.broker == "kafka":
            if round_number == 1:
                asyncio.run(load_kafka(bench, run, data))
        else:
            by_label = zip(labels, names, strict=True)
            queues = {label: contestants[name].feed for label, name in by_label}
            asyncio.run(load_rabbitmq(bench, run, data, queues))
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
            asyncio.run(drop_rabbitmq_queues(bench, run, labels))
    for name in LATENCY if args.only is None else []:
        print(f"{name} ...", file=sys.stderr)
        results[name] = run_child(run, name, name)
        if args.broker == "rabbitmq":  # the latency run's own queues (see ours.latency)
            asyncio.run(drop_rabbitmq_queues(bench, f"{run}-{name}", [name, f"{name}-producer"]))

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
        if ours_name in results and peer in results
    ]
    latency_targets = [
        {"run": name, "figure": figure, "value": results[name][figure], "at_most": bound}
        for name, figure, bound in LATENCY_TARGETS
        if name in results
    ]
    report = {
        "broker": args.broker,
        "run": run,  # in the topic, queue and group names
        "events": args.events,
        "slow_events": min(args.events, args.slow_events),
        "payload_bytes": PAYLOAD_BYTES,
        "duplicate_share": DUPLICATE_SHARE,
        "batch_size": BATCH,
        "rounds": args.rounds,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "versions": versions(),
        "results": results,
        "ratios": ratios,
        "latency_targets": latency_targets,
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
        f"{'contestant':30} {'msg/s':>10} {'messages':>9} {'seconds':>8} {'CPU us/msg':>11}"
        f" {'peak RSS MB':>12} {'store writes/s':>15}"
    )
    for name, result in report["results"].items():
        if name in LATENCY:
            continue
        writes = result.get("store_writes_per_s")
        print(
            f"{name:30} {result['rate']:10.0f} {result['messages']:9} {result['seconds']:8.2f} "
            f"{result['cpu_us_per_message']:11.1f} {result['peak_rss_mb']:12.1f} "
            f"{'' if writes is None else f'{writes:15.1f}'}"
        )
    for name in LATENCY:
        if name not in report["results"]:
            continue
        lat = report["results"][name]
        print(
            f"publish -> ack at {lat['offered_rate']} msg/s (etcd state, {lat['handler']}"
            f" handler): p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms over"
            f" {lat['messages']} messages"
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
    for row in report["latency_targets"]:
        mark = "met" if row["value"] <= row["at_most"] else "NOT met"
        print(f"  {row['run']} {row['figure']}: {row['value']} (target <= {row['at_most']}) {mark}")


if __name__ == "__main__":
    if args.contestant is not None:
        child(args.run, args.contestant, args.label or args.contestant)
    else:
        main()
