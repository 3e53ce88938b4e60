"""Test harness for owners: run handlers through the real loop on an in-memory bus.

async def test_reserves_stock(service: ServiceHarness) -> None:
    await service.publish(OrderPlaced(order_id="o-1", quantity=1), key="o-1")
    await service.run_until_idle()
    assert [e.order_id for e in service.payloads(StockReserved)] == ["o-1"]
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf.message import Message

from .app import build_loop, event_registry
from .brokers.base import DLQ_ERROR, DLQ_REASON, OutboundMessage, event_message
from .brokers.memory import MemoryBroker, MemoryBus, memory_limits
from .config import Settings
from .envelope import CloudEventsProtobufCodec, Envelope, event_type_of, new_event_id, now
from .loop import LoopStats
from .router import Router
from .state import StateStore, open_state_store
from .state.memory import MemoryStateStore

M = TypeVar("M", bound=Message)
TEST_SOURCE = "urn:test"


@dataclass(frozen=True, slots=True)
class ParkedMessage:
    """A message in the dead-letter destination."""

    reason: str
    error: str
    body: bytes
    headers: dict[str, str]


class ServiceHarness:
    """A private bus and state store; each `run_until_idle` runs a fresh loop over them."""

    def __init__(self, router: Router, **settings: Any) -> None:
        defaults: dict[str, Any] = {
            "broker_url": "memory://",
            "state_url": "memory://",
            "batch_timeout_ms": 5,
            "commit_interval_ms": 1,
            "retry_initial_backoff_ms": 1,
            "retry_max_backoff_ms": 5,
        }
        self.settings = Settings(**{**defaults, **settings})
        self.router = router
        self.bus = MemoryBus()
        # A private memory store, unless the test asks for another (e.g. sqlite:// files).
        self.state: StateStore = (
            MemoryStateStore(self.settings.dedupe_max_ids, self.settings.dedupe_ttl_s, time.time)
            if self.settings.state_url.startswith("memory:")
            else open_state_store(self.settings)
        )
        self.codec = CloudEventsProtobufCodec(event_registry(router))
        self.stats = LoopStats()
        self._published_by_test: set[int] = set()
        # Bind now so events published before the first run are queued for the service.
        self.bus.bind(
            self.settings.consumer_group,
            [self.settings.topic_for(name) for name in router.event_types()],
        )

    @property
    def group(self) -> str:
        return self.settings.consumer_group

    async def publish(
        self,
        message: Message,
        *,
        key: str = "",
        event_id: str | None = None,
        event_type: str | None = None,
        topic: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        """Publish an event as another service would; returns its id."""
        envelope = Envelope(
            id=event_id or new_event_id(),
            type=event_type or event_type_of(message),
            source=TEST_SOURCE,
            payload=message,
            subject=key,
            time=now(),
        )
        topic = topic or self.settings.topic_for(event_type_of(message))
        self._put(event_message(self.codec, envelope, topic, headers or {}))
        return envelope.id

    def publish_raw(
        self, body: bytes, topic: str, *, key: str = "", headers: dict[str, str] | None = None
    ) -> None:
        """Publish arbitrary bytes (poison messages, foreign formats) to `topic`."""
        self._put(OutboundMessage(topic=topic, body=body, key=key, headers=headers or {}))

    def _put(self, message: OutboundMessage) -> None:
        self._published_by_test.add(id(message))
        self.bus.put(message)

    async def run_until_idle(self, deadline_s: float = 10.0) -> LoopStats:
        """Run the real loop until every queued event is acked, then stop it gracefully."""
        loop = build_loop(
            self.settings,
            self.router,
            broker=MemoryBroker(
                self.bus,
                self.group,
                limits=memory_limits(self.settings.max_message_bytes),
                dead_letters=self.settings.dead_letter_topic,
            ),
            state=self.state,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(loop.run(stop))
        try:
            async with asyncio.timeout(deadline_s):
                # Polling keeps the memory bus free of test-only hooks.
                while self.bus.pending(self.group) and not task.done():  # noqa: ASYNC110
                    await asyncio.sleep(0.001)
        finally:
            stop.set()
            self.stats = await task
        return self.stats

    async def state_of(self, key: str) -> dict[str, Any]:
        """What stateful handlers stored in `ctx.state` for `key` (committed state only)."""
        await self.state.open()
        stored = await self.state.load_states(self.group, [key])
        value = stored[key].value
        return dict(json.loads(value)) if value is not None else {}

    def emitted(self, message_type: type[Message] | None = None) -> list[Envelope]:
        """Envelopes the service published (not dead letters), optionally of one type."""
        found = []
        for message in self.bus.published:
            if id(message) in self._published_by_test:
                continue
            if message.dead_letter:
                continue
            wanted = (
                None
                if message_type is None
                else self.settings.topic_for(event_type_of(message_type))
            )
            if wanted is not None and message.topic != wanted:
                continue
            found.append(self.codec.decode(message.body))
        return found

    def payloads(self, message_type: type[M]) -> list[M]:
        """Payloads of the emitted events of `message_type`, in emit order."""
        return [envelope.payload for envelope in self.emitted(message_type)]  # type: ignore[misc]

    @property
    def dead_letters(self) -> list[ParkedMessage]:
        return [
            ParkedMessage(
                reason=message.headers[DLQ_REASON],
                error=message.headers[DLQ_ERROR],
                body=message.body,
                headers=dict(message.headers),
            )
            for message in self.bus.published
            if message.dead_letter
        ]
