"""Helpers for the template's own runtime tests (template-owned; do not edit)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import Message
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from {{ cookiecutter.package_name }}.runtime.app import build_loop
from {{ cookiecutter.package_name }}.runtime.brokers.base import InboundMessage
from {{ cookiecutter.package_name }}.runtime.brokers.memory import MemoryBroker, MemoryBus
from {{ cookiecutter.package_name }}.runtime.config import ENV_PREFIX, Settings
from {{ cookiecutter.package_name }}.runtime.errors import DeadLetter
from {{ cookiecutter.package_name }}.runtime.health import Heartbeat
from {{ cookiecutter.package_name }}.runtime.loop import ConsumerLoop, LoopStats
from {{ cookiecutter.package_name }}.runtime.router import Context, Router
from {{ cookiecutter.package_name }}.runtime.state.base import StateStore
from {{ cookiecutter.package_name }}.runtime.telemetry import tracer_provider
from {{ cookiecutter.package_name }}.runtime.testing import ServiceHarness

FAST: dict[str, Any] = {
    "batch_timeout_ms": 5,
    "commit_interval_ms": 1,
    "retry_initial_backoff_ms": 1,
    "retry_max_backoff_ms": 2,
    "publish_retry_max_backoff_ms": 5,
}


def fast_settings(**overrides: Any) -> Settings:
    return Settings(**{**FAST, **overrides})


class Journal:
    """Records, in order, what the loop did to the bus and the store."""

    def __init__(self) -> None:
        self.entries: list[str] = []


class JournalingBroker(MemoryBroker):
    def __init__(self, bus: MemoryBus, group: str, journal: Journal) -> None:
        super().__init__(bus, group)
        self.journal = journal

    async def publish(self, messages: Any) -> Any:
        unrouted = await super().publish(messages)
        self.journal.entries.append(f"publish:{len(messages)}")
        return unrouted

    async def ack(self, messages: Any) -> None:
        self.journal.entries.append(f"ack:{len(messages)}")
        await super().ack(messages)


class GatedBroker(MemoryBroker):
    """Fetches only while its gate is open; its acks can be made to hang (a crash point)."""

    def __init__(self, bus: MemoryBus, group: str, *, exclusive: bool = False) -> None:
        super().__init__(bus, group, exclusive=exclusive)
        self.gate = asyncio.Event()
        self.gate.set()
        self.hang_acks = False

    async def _take(self, max_messages: int, max_wait_s: float) -> list[InboundMessage]:
        """The memory broker's one wait for deliveries, gated: a closed gate delivers
        nothing, also to a wait that began while it was open."""
        if not self.gate.is_set():
            await asyncio.sleep(max_wait_s)
            return []
        taken = await super()._take(max_messages, max_wait_s)
        if taken and not self.gate.is_set():  # closed while waiting: give them back
            queue = self.bus.queue(self.group)
            for message in reversed(taken):
                del queue.unacked[message.position], self._delivered[message.position]
                queue.ready.appendleft(message)
            return []
        return taken

    async def ack(self, messages: Any) -> None:
        if self.hang_acks:
            await asyncio.Event().wait()  # killed here: handled and recorded, never acked
        await super().ack(messages)


class FixableHandler:
    """A handler of `message_type` that dead-letters every event until `fixed` (a fix
    deployed), then records the ids it handled: what the operator commands redrive."""

    def __init__(self, message_type: type[Message] | None) -> None:
        assert message_type is not None
        self.fixed = False
        self.handled: list[str] = []
        self.router = Router()

        @self.router.handles(message_type)
        async def handle(payload: Any, ctx: Context) -> None:
            if not self.fixed:
                raise DeadLetter("broken", "the handler is not fixed yet")
            self.handled.append(ctx.envelope.id)


class RecordingHeartbeat(Heartbeat):
    """Remembers every readiness the loop reported."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.readiness: list[bool] = []

    def beat(self, *, ready: bool) -> None:
        self.readiness.append(ready)
        super().beat(ready=ready)


class RunningLoop:
    """A loop running in a task, stoppable gracefully (SIGTERM) or abruptly (crash)."""

    def __init__(self, loop: ConsumerLoop) -> None:
        self.loop = loop
        self.stop = asyncio.Event()
        self.task: asyncio.Task[LoopStats] = asyncio.create_task(loop.run(self.stop))

    async def wait_started(self, deadline_s: float = 30.0) -> None:
        """Wait until the loop subscribed: messages published after this reach it."""
        await self.wait_until(self.loop.started.is_set, deadline_s)

    async def wait_until(self, done: Callable[[], bool], deadline_s: float = 60.0) -> None:
        """Wait until `done()` holds. The deadline only stops a hung test: a loaded CI
        machine (parallel bakes on two cores) takes several times longer than a desk."""
        async with asyncio.timeout(deadline_s):
            while not done():
                if self.task.done():
                    self.task.result()
                    raise AssertionError("the loop stopped before the condition held")
                await asyncio.sleep(0.001)

    async def stop_gracefully(self) -> LoopStats:
        self.stop.set()
        return await self.task

    async def crash(self) -> None:
        """Kill the loop mid-flight: nothing more is acked, the bus takes deliveries back."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def make_loop(
    router: Router,
    bus: MemoryBus,
    state: StateStore,
    settings: Settings,
    broker: MemoryBroker | None = None,
) -> ConsumerLoop:
    return build_loop(
        settings,
        router,
        broker=broker or MemoryBroker(bus, settings.consumer_group),
        state=state,
    )


# One encoding harness per router: building one (its settings read the environment) costs
# more than publishing, and tests publish thousands.
_ENCODERS: weakref.WeakKeyDictionary[Router, ServiceHarness] = weakref.WeakKeyDictionary()


async def publish_to(bus: MemoryBus, router: Router, message: Message, **options: Any) -> str:
    """Publish `message` to `bus` in the envelope, as another service would; returns its id."""
    encoder = _ENCODERS.get(router) or _ENCODERS.setdefault(router, ServiceHarness(router))
    event_id = await encoder.publish(message, **options)
    bus.put(encoder.bus.published[-1])
    return event_id


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runtime tests see only the variables they set themselves."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> InMemorySpanExporter:
    """An in-memory span exporter behind the process's tracer provider (set once), made
    as the service makes it (parentbased_always_on)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = tracer_provider()
        provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
        trace.set_tracer_provider(provider)
    EXPORTER.clear()
    return EXPORTER


def one_span(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    [span] = [span for span in spans if span.name == name]
    return span
