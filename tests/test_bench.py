"""The benchmark runs with its one command and reports every figure (tiny sizes here:
this checks that it works, never how fast anything is)."""

from __future__ import annotations

import json

import pytest

from .conftest import TEMPLATE, run_ok, tool_env

pytestmark = [pytest.mark.slow, pytest.mark.servers]


def test_bench_runs_end_to_end_and_writes_its_figures() -> None:
    env = {**tool_env(), "BENCH_IDS": "5000", "BENCH_SECONDS": "0.5"}
    result = run_ok(
        ["bash", "bench/run.sh", "--events", "1500", "--rounds", "1", "--latency-rate", "300"],
        cwd=TEMPLATE,
        env=env,
        timeout=1200,
    )
    results = json.loads((TEMPLATE / "build" / "bench" / "results.json").read_text())
    for broker, bare in (
        ("kafka", "bare-aiokafka-batch"),
        ("rabbitmq", "bare-aio-pika-multiple-ack"),
    ):
        report = results[broker]
        contestants = set(report["results"])
        assert {"ours-etcd-state", "faststream-ack", "faststream-ack-first", bare} <= contestants
        assert report["results"]["latency"]["p99_ms"] > 0
        assert all(row["ratio"] > 0 for row in report["ratios"])
    state = json.loads((TEMPLATE / "build" / "bench" / "state.json").read_text())
    assert state["bytes_per_remembered_id"] > 0
    assert "ratios (ours / peer, target)" in result.stdout
