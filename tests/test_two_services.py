"""Two baked services in one process: both load (the envelope's protobuf registration
does not clash), and one trace follows an event from the first to the second."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .conftest import TEMPLATE, bake, run_ok, tool_env

pytestmark = [pytest.mark.slow, pytest.mark.servers]


def test_two_baked_services_chain_one_trace(tmp_path: Path) -> None:
    orders = bake(tmp_path / "a", service_name="order-service")
    billing = bake(tmp_path / "b", service_name="billing-service", broker="rabbitmq")
    env = tool_env()
    subprocess.run(["uv", "sync", "--quiet"], cwd=orders, env=env, check=True, timeout=600)
    python = orders / ".venv" / "bin" / "python"
    subprocess.run(
        ["uv", "pip", "install", "--quiet", "--python", str(python), "-e", str(billing)],
        cwd=orders,
        env=env,
        check=True,
        timeout=600,
    )
    chain = TEMPLATE / "tests" / "two_services" / "chain.py"
    result = run_ok([str(python), str(chain)], env=env, timeout=120)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert [span["kind"] for span in report["spans"]] == [
        "PRODUCER",
        "CONSUMER",
        "PRODUCER",
        "CONSUMER",
    ]
