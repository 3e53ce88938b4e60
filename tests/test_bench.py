"""The benchmark runs with its one command and reports every figure (tiny sizes here:
this checks that it works, never how fast anything is)."""

from __future__ import annotations

import json

import pytest

from .conftest import TEMPLATE, run_ok, tool_env

pytestmark = [pytest.mark.slow, pytest.mark.servers]

# Every broker's contestants besides its bare client's (named per broker below).
CONTESTANTS = {
    "ours-memory-state",
    "ours-etcd-state",
    "ours-etcd-traced-1pct",
    "ours-etcd-emit-one",
    "ours-etcd-stateful",
    "ours-etcd-sample",
    "faststream-ack",
    "faststream-ack-first",
    "faststream-relay-ack",
}
# The ratios issue 21 sets targets for, per broker: (ours, peer).
RATIOS = {
    "kafka": {
        ("ours-etcd-emit-one", "bare-aiokafka-relay"),
        ("ours-etcd-stateful", "ours-etcd-state"),
        ("ours-etcd-sample", "bare-aiokafka-relay"),
        ("ours-etcd-state", "bare-aiokafka-batch"),
        ("ours-etcd-emit-one", "faststream-relay-ack"),
    },
    "rabbitmq": {
        ("ours-etcd-emit-one", "bare-aio-pika-relay"),
        ("ours-etcd-stateful", "ours-etcd-state"),
        ("ours-etcd-emit-one", "faststream-relay-ack"),
    },
}
EVENTS = 1500


def test_bench_runs_end_to_end_and_writes_its_figures() -> None:
    env = {**tool_env(), "BENCH_IDS": "5000", "BENCH_SECONDS": "0.5"}
    env |= {"BENCH_INSTRUCTION_SHAPES": "noop,stateful", "BENCH_INSTRUCTION_EVENTS": "500,1000"}
    command = ["bash", "bench/run.sh", "--events", str(EVENTS), "--rounds", "1"]
    command += ["--latency-rate", "300", "--latency-seconds", "1"]
    result = run_ok(command, cwd=TEMPLATE, env=env, timeout=1200)
    results = json.loads((TEMPLATE / "build" / "bench" / "results.json").read_text())
    for broker, client, batch_loop in (
        ("kafka", "aiokafka", "batch"),
        ("rabbitmq", "aio-pika", "multiple-ack"),
    ):
        report = results[broker]
        expected = CONTESTANTS | {f"bare-{client}-{batch_loop}", f"bare-{client}-relay"}
        assert expected <= set(report["results"])
        for name in expected:
            assert report["results"][name]["messages"] >= EVENTS, name
        for name in ("latency", "latency-sample"):
            assert report["results"][name]["p99_ms"] > 0
        assert {(row["ours"], row["peer"]) for row in report["ratios"]} >= RATIOS[broker]
        assert all(row["ratio"] > 0 for row in report["ratios"])
        assert [row["run"] for row in report["latency_targets"]] == ["latency-sample"]
        # The emitting handlers did emit, one event each, and every one was routed.
        unique = (
            report["results"]["ours-etcd-state"]["messages"]
            - (report["results"]["ours-etcd-state"]["duplicates_dropped"])
        )
        for name in ("ours-etcd-emit-one", "ours-etcd-sample"):
            assert report["results"][name]["emitted"] == unique, name
            assert report["results"][name]["unrouted"] == 0, name
            assert report["results"][name]["dead_lettered"] == 0, name
    state = json.loads((TEMPLATE / "build" / "bench" / "state.json").read_text())
    assert state["bytes_per_remembered_id"] > 0
    # Instructions per event, counted by valgrind: one more stateful event costs more.
    instructions = json.loads((TEMPLATE / "build" / "bench" / "instructions.json").read_text())
    assert instructions["counter"] == "valgrind"
    assert set(instructions["per_event"]) == {"noop", "stateful"}
    assert 0 < instructions["per_event"]["noop"] < instructions["per_event"]["stateful"]
    assert "stateful / no-op:" in result.stdout
    assert "ratios (ours / peer, target)" in result.stdout
    assert "latency-sample p99_ms" in result.stdout
