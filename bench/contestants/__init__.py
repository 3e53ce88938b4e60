"""The contestants of bench/throughput.py, by name: which feed each reads and what runs it
(in its own process). `common` holds what they share, `ours` the service's loop with
each handler shape, `peers` the client libraries alone and FastStream."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from . import ours, peers
from .common import Bench, Feed, feeds


@dataclass(frozen=True)
class Contestant:
    feed: Feed
    # (run, label, how many messages) -> its result
    start: Callable[[str, str, int], Coroutine[Any, Any, dict[str, Any]]]
    slow: bool = False  # a few hundred msg/s: takes at most --slow-events messages


def table(bench: Bench) -> dict[str, Contestant]:
    text, orders = feeds(bench)["text"], feeds(bench)["orders"]

    def loop(state: str, shape: str, sample: float | None = None) -> Contestant:
        feed = orders if shape == "sample" else text
        return Contestant(
            feed,
            lambda run, name, total: ours.ours(bench, run, name, total, state, shape, sample),
        )

    def faststream(policy: str, relay: bool = False) -> Contestant:
        return Contestant(
            text,
            lambda run, name, total: peers.faststream(bench, run, name, text, total, policy, relay),
            slow=relay,
        )

    found = {
        "ours-memory-state": loop("memory", "noop"),
        "ours-etcd-state": loop("etcd", "noop"),
        "ours-etcd-traced-1pct": loop("etcd", "noop", 0.01),
        "ours-etcd-emit-one": loop("etcd", "emit-one"),
        "ours-etcd-stateful": loop("etcd", "stateful"),
        "ours-etcd-sample": loop("etcd", "sample"),
        "faststream-ack": faststream("ack"),
        "faststream-ack-first": faststream("ack_first"),
        "faststream-relay-ack": faststream("ack", relay=True),
    }

    def bare(relay: bool) -> Contestant:
        if bench.broker == "kafka":
            return Contestant(
                text,
                lambda run, name, total: peers.bare_aiokafka(run, name, text, total, relay),
            )
        return Contestant(
            text, lambda run, name, total: peers.bare_aio_pika(run, name, total, relay)
        )

    client = "aiokafka" if bench.broker == "kafka" else "aio-pika"
    batch_loop = "batch" if bench.broker == "kafka" else "multiple-ack"
    found[f"bare-{client}-{batch_loop}"] = bare(relay=False)
    found[f"bare-{client}-relay"] = bare(relay=True)
    return found


# Latency runs: (handler shape, feed name) of the loop, etcd state, at a steady rate.
LATENCY = {"latency": ("noop", "text"), "latency-sample": ("sample", "orders")}


def latency(bench: Bench, run: str, name: str) -> Coroutine[Any, Any, dict[str, Any]]:
    shape, feed = LATENCY[name]
    return ours.latency(bench, run, name, feeds(bench)[feed], shape)
