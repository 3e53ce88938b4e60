"""Outage test: a baked service lives through its broker's restarts and its store's outages.

Per scenario (tests/crash/outage.py): the RabbitMQ node, or the Kafka broker (tansu), is
stopped and started again during a run; or the etcd holding a Kafka service's state is
SIGKILLed and started again several times under load. Each is a server of the test's own
(tests/crash/servers.py), never a shared one. The same service process must handle every
event, park every poison message and stop cleanly on SIGTERM. The driver's figures are
echoed with `-s`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from .conftest import crash_driver_figures, require, tool_env

pytestmark = [pytest.mark.slow, pytest.mark.servers]

# What each scenario needs: the broker flavour baked, and the environment that names the
# binaries of its private servers (scripts/servers.sh installs them).
SCENARIOS = {
    "rabbitmq": ("rabbitmq", []),
    "kafka": ("kafka", ["TEST_TANSU_BIN", "TEST_S3_SERVER_BIN"]),
    "etcd": ("kafka", ["TEST_TANSU_BIN"]),
}
BINARIES = {"rabbitmq": "/usr/lib/rabbitmq/bin/rabbitmq-server", "etcd": "etcd"}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_the_service_lives_through_outages_and_loses_nothing(tmp_path: Path, scenario: str) -> None:
    broker, variables = SCENARIOS[scenario]
    missing = [name for name in variables if not os.environ.get(name)]
    if scenario in BINARIES and shutil.which(BINARIES[scenario]) is None:
        missing.append(BINARIES[scenario])
    require(missing)
    figures = crash_driver_figures(tmp_path, broker, "outage.py", scenario, env=tool_env())
    print(f"\noutage test figures ({scenario}): {json.dumps(figures)}")

    assert figures["outages"] >= 2
    assert len(figures["resumed_after_restart_s"]) == figures["outages"]  # handled after each
    # The service felt the outage: it retried a step, or its RabbitMQ connection
    # reconnected (an idle moment has no step to retry). aiokafka reconnects inside its
    # client, so a Kafka consumer that had nothing to commit while down feels neither.
    felt = figures["retried_steps"] + figures["reconnects"]
    assert felt > 0 or scenario == "kafka", "no outage reached the service"
    assert figures["service_starts"] == 1
    assert figures["alive_after_outages"], "the service process ended during an outage"
    assert figures["missing"] == 0, "events lost"
    assert figures["poison_parked"] == figures["poison"], "poison not parked"
    assert figures["exit_code_on_sigterm"] == 0
