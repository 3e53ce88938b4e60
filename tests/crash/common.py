"""What the crash and outage drivers share: the baked service's modules, the events they
publish, the service run as a subprocess, and the log of what its handlers ran
(tests/crash/handlers.py writes it). Run with a baked service's interpreter, from the
service's folder.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path.cwd()))  # the baked service's tests/ package


class Modules:
    """The baked service's runtime modules the drivers use."""

    def __init__(self, package: str) -> None:
        self.package = package
        self.runtime = importlib.import_module(f"{package}.runtime")
        self.config = importlib.import_module(f"{package}.runtime.config")
        self.brokers = importlib.import_module(f"{package}.runtime.brokers")
        self.envelope = importlib.import_module(f"{package}.runtime.envelope")
        self.orders = importlib.import_module(f"{package}.events.orders_pb2")

    def support(self, broker_url: str) -> ModuleType:
        """The baked integration suite's helpers for this broker (dead-letter reading)."""
        name = "kafka_support" if broker_url.startswith("kafka:") else "rabbitmq_support"
        return importlib.import_module(f"tests.integration.{name}")

    def producer_settings(self, run: str, broker_url: str) -> Any:
        """Settings of the driver's producer: the service's topics, a group of its own."""
        return self.config.Settings(
            broker_url=broker_url,
            consumer_group=f"crash-{run}-producer",
            topic_prefix=f"crash-{run}.",
        )

    def service_env(self, run: str, out: Path, broker_url: str, state_url: str) -> dict[str, str]:
        """The service's environment: its own group and topics, handlers logging to `out`."""
        prefix = self.config.ENV_PREFIX
        return {
            f"{prefix}BROKER_URL": broker_url,
            f"{prefix}STATE_URL": state_url,
            f"{prefix}CONSUMER_GROUP": f"crash-{run}",
            f"{prefix}TOPIC_PREFIX": f"crash-{run}.",
            f"{prefix}BATCH_SIZE": os.environ.get("CRASH_BATCH_SIZE", "100"),
            f"{prefix}HEARTBEAT_FILE": str(out / "heartbeat"),
            f"{prefix}LOG_LEVEL": "WARNING",
            f"{prefix}KAFKA_SESSION_TIMEOUT_MS": "6000",
            f"{prefix}KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
            "CRASH_TEST_LOG": str(out / "handled.log"),
            "CRASH_HANDLER_DELAY_S": "0.01",
        }


class Events:
    """OrderPlaced events as the drivers publish them, on one topic."""

    def __init__(self, modules: Modules, settings: Any) -> None:
        self.modules = modules
        envelope, orders = modules.envelope, modules.orders
        self.topic = settings.topic_for(envelope.event_type_of(orders.OrderPlaced))
        self.codec = envelope.CloudEventsProtobufCodec(envelope.TypeRegistry([orders.OrderPlaced]))

    def encode(self, event_id: str, key: str) -> Any:
        envelope, orders = self.modules.envelope, self.modules.orders
        body = self.codec.encode(
            envelope.Envelope(
                id=event_id,
                type=envelope.event_type_of(orders.OrderPlaced),
                source="urn:crash-test",
                payload=orders.OrderPlaced(order_id=event_id, quantity=1),
                subject=key,
            )
        )
        return self.modules.brokers.OutboundMessage(self.topic, body, key)

    def poison(self, body: bytes) -> Any:
        return self.modules.brokers.OutboundMessage(self.topic, body, "")


def handled_lines(out: Path) -> list[tuple[str, int]]:
    """(event id, the key's ctx.state count after it) per handler run, in order."""
    path = out / "handled.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(event_id, int(count)) for event_id, count in (line.split() for line in lines)]


def handled(out: Path) -> list[str]:
    return [event_id for event_id, _ in handled_lines(out)]


class Service:
    """`python -m PACKAGE run` in a subprocess, its output appended to service.log."""

    def __init__(self, package: str, out: Path, env: dict[str, str]) -> None:
        self.package, self.out, self.env = package, out, env
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log = open(out / "service.log", "ab")  # noqa: SIM115 - lives as long as the run

    async def start(self) -> float:
        """Start it; return the seconds until its first heartbeat (connected, subscribed)."""
        heartbeat = self.out / "heartbeat"
        heartbeat.unlink(missing_ok=True)
        began = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.package, "run"],
            env={**os.environ, **self.env},
            stdout=self.log,
            stderr=self.log,
        )
        self.starts += 1
        while not heartbeat.exists():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"service exited with {self.process.returncode}; see service.log"
                )
            await asyncio.sleep(0.05)
        return time.monotonic() - began

    def log_tail(self, characters: int = 4000) -> str:
        self.log.flush()
        return (self.out / "service.log").read_text(errors="replace")[-characters:]

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


async def wait_for(condition: Any, deadline_s: float) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if condition():
            return True
        await asyncio.sleep(0.2)
    return bool(condition())
