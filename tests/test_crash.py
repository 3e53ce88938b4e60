"""Crash test: SIGKILL a baked service at random moments against each real broker.

Proves, per broker: no event is lost (each is handled or parked in the dead-letter
destination), producer duplicates after recovery are not handled again, and re-handled
events are only those in flight at a kill (at most 2 x BATCH_SIZE per kill). The driver
(tests/crash/driver.py) prints its figures; they are echoed here with `-s`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .conftest import crash_driver_figures, require, tool_env

pytestmark = [pytest.mark.slow, pytest.mark.servers]

ADDRESSES = {"kafka": "TEST_KAFKA_BOOTSTRAP", "rabbitmq": "TEST_AMQP_URL"}


@pytest.mark.parametrize("state", ["sqlite", "etcd"])
@pytest.mark.parametrize("broker", ["kafka", "rabbitmq"])
def test_sigkill_loses_nothing_and_rehandles_only_in_flight(
    tmp_path: Path, broker: str, state: str
) -> None:
    variable = ADDRESSES[broker]
    needed = [variable] + (["TEST_ETCD_ENDPOINTS"] if state == "etcd" else [])
    require([name for name in needed if not os.environ.get(name)])
    env = tool_env()
    env["CRASH_STATE"] = state
    for other in set(ADDRESSES.values()) - {variable}:
        env.pop(other, None)
    figures = crash_driver_figures(tmp_path, broker, "driver.py", env=env)
    print(f"\ncrash test figures ({broker}, {state}): {json.dumps(figures)}")

    assert figures["kills"] >= 3
    assert figures["missing"] == 0, "events lost"
    assert figures["poison_parked"] == figures["poison"], "poison not parked"
    assert figures["rehandled_at_kills"] <= figures["rehandled_bound"]
    assert figures["duplicates_rehandled"] == 0
    assert figures["sentinels_handled"] == 12
    assert figures["keys_with_wrong_state_count"] == 0, "ctx.state applied twice or lost"
    assert figures["exit_code_on_sigterm"] == 0
