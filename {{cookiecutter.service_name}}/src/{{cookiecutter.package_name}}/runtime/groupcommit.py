"""Group commit: handled batches are made durable together, one group after another.

A group takes every batch handled since it was opened. It is written once
COMMIT_INTERVAL_MS passed since the group before it began writing, or at once when it is
full (or closed to a batch handled under another fence): publish what it emitted and
wait for the bus to confirm, one store write per stream, then one ack. Groups are
written in order, so acks stay in batch order; meanwhile the next batches are handled."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .brokers.base import Broker, InboundMessage
from .clock import Clock
from .config import Settings
from .outbound import Outbound
from .reaction import Reaction
from .retry import Outages
from .state.base import StateStore
from .telemetry import LoopMetrics

# Messages a group may gather before it is written without waiting out the interval (a
# whole batch if BATCH_SIZE is larger): this bounds what is held in memory, and what runs
# again after a crash, while the store is slow. 8 batches of the default size.
MAX_GROUP_MESSAGES = 4_000


class DurableSink(Protocol):
    """Where a group's messages themselves are made durable before the ack, instead of
    handlers reacting to them (the archiver: archive/sink.py)."""

    full_at: int  # a group of this many messages is written at once
    full_bytes: int  # ... or of this many bytes

    async def write(self, messages: Sequence[InboundMessage], outages: Outages) -> None: ...


@dataclass(slots=True)
class _Group:
    """Handled batches made durable together; open to more batches until it is written."""

    messages: list[InboundMessage]
    reaction: Reaction
    due: asyncio.Event = field(default_factory=asyncio.Event)  # write without waiting
    after: asyncio.Future[None] | None = None  # the group before: durable first
    size: int = 0  # bytes of the messages' bodies (a sink's groups fill by size too)


class GroupCommit:
    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        store: StateStore,
        outbound: Outbound,
        outages: Outages,
        metrics: LoopMetrics,
        clock: Clock,
        acked: Callable[[int, Reaction], None],
        sink: DurableSink | None = None,
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.store = store
        self.outbound = outbound
        self.outages = outages
        self.metrics = metrics
        self.clock = clock
        self.acked = acked  # told of each group once acked
        self.sink = sink
        self._open: _Group | None = None  # the last group, while it takes batches
        self._durable: asyncio.Future[None] | None = None  # the last group's write
        self._last_write_at = -float("inf")
        # A group is written at once when this full; the bus must still be able to deliver
        # the next batch while it is written.
        self._full_at = max(
            settings.batch_size, MAX_GROUP_MESSAGES if sink is None else sink.full_at
        )
        self._full_bytes = None if sink is None else sink.full_bytes
        if broker.max_unacked is not None:
            room = broker.max_unacked - settings.batch_size
            self._full_at = max(1, min(self._full_at, room))

    def next_write_at(self) -> float:
        """Monotonic time from which the next group may be written, unless it is due."""
        return self._last_write_at + self.settings.commit_interval_ms / 1000

    def last_ended(self) -> bool:
        """Whether the last group's write ended (`settle` then says how)."""
        return self._durable is not None and self._durable.done()

    async def add(self, batch: Sequence[InboundMessage], reaction: Reaction) -> None:
        """Hand a reacted batch to the open group, or open a group with it."""
        if self.last_ended():
            await self.settle()  # learn how the last group ended (fenced: `batch` is not kept)
        group = self._open
        if group is not None and group.reaction.joins(reaction):
            group.messages += batch
            group.reaction.absorb(reaction)
        else:
            if group is not None:
                group.due.set()  # closed to `batch`: nothing is gained by waiting
            group = _Group(list(batch), reaction, after=self._durable)
            self._open = group
            self._durable = asyncio.ensure_future(self._write(group))
        full_bytes = self._full_bytes
        if full_bytes is not None:
            group.size += sum(len(message.body) for message in batch)
        if len(group.messages) >= self._full_at or (
            full_bytes is not None and group.size >= full_bytes
        ):
            group.due.set()
            if group.after is not None:  # hold no more than one full group in memory
                await group.after

    async def settle(self) -> None:
        """Make every handled batch durable now and wait until it is acked; raises what
        that raised."""
        durable, self._durable = self._durable, None
        if self._open is not None:
            self._open.due.set()
            self._open = None
        if durable is not None:
            await durable

    async def abandon(self) -> None:
        """Drop the groups not yet acked (they will be redelivered)."""
        durable, self._durable, self._open = self._durable, None, None
        if durable is not None:
            durable.cancel()
            await asyncio.gather(durable, return_exceptions=True)

    async def _write(self, group: _Group) -> None:
        """Once the group before is durable and the interval passed (or the group is due):
        publish, checkpoint, then ack."""
        if group.after is not None:
            await group.after
            group.after = None
        wait = self.next_write_at() - self.clock.monotonic()
        if wait > 0 and not group.due.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await group.due.wait()
        if self._open is group:  # closed: later batches open the next group
            self._open = None
        self._last_write_at = self.clock.monotonic()
        batch, reaction = group.messages, group.reaction
        if reaction.outbound:
            await self.outbound.publish(reaction, self.outages)
        if reaction.processed or reaction.states or reaction.progress:
            started = self.clock.monotonic()
            await self.outages.until_done("checkpoint", lambda: self._checkpoint(reaction))
            self.metrics.checkpoint_duration.record(self.clock.monotonic() - started)
        if self.sink is not None:
            await self.sink.write(batch, self.outages)
        await self.outages.until_done("ack", lambda: self.broker.ack(batch))
        self.acked(len(batch), reaction)

    async def _checkpoint(self, reaction: Reaction) -> None:
        """One store write per stream, all at once."""
        outcomes = await asyncio.gather(
            *(self.store.commit(checkpoint) for checkpoint in reaction.checkpoints()),
            return_exceptions=True,
        )
        # Raised once every stream's write has ended: a retry never races a write in flight.
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
