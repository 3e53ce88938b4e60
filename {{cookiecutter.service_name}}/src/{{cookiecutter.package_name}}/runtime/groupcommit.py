"""Group commit: handled batches are made durable together, one group after another.

A group takes every batch handled since it was opened. It is written once
COMMIT_INTERVAL_MS passed since the group before it began writing, or at once when it is
full (or closed to a batch handled under another fence): publish what it emitted and
wait for the bus to confirm, one store write per stream, then one ack. Groups are
written in order, pipelined: a group publishes once the group before it was confirmed by
the bus (and the one before that acked), and writes its checkpoint and acks once the
group before it was acked. So events go out in group order, checkpoints and acks stay
in batch order, and nothing is acked before its own events are confirmed and its
checkpoint is written; meanwhile the next batches are handled, until two full groups'
messages wait unacked."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .brokers.base import Broker, InboundMessage
from .clock import Clock
from .config import Settings
from .gathering import all_or_raise
from .publishing import Publisher
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
    before: _Group | None  # the group written before this one (until it is acked)
    due: asyncio.Event = field(default_factory=asyncio.Event)  # write without waiting
    # Set once its events are confirmed (or it published nothing): the next group's go.
    published: asyncio.Event = field(default_factory=asyncio.Event)
    durable: asyncio.Future[None] | None = None  # its write, ended once acked
    size: int = 0  # bytes of the messages' bodies (a sink's groups fill by size too)

    async def wait_published(self) -> None:
        """Until its events are confirmed, or its write ended (raises how it failed)."""
        durable = self.durable
        assert durable is not None
        if not self.published.is_set():
            publishing = asyncio.ensure_future(self.published.wait())
            try:
                await asyncio.wait((publishing, durable), return_when=asyncio.FIRST_COMPLETED)
            finally:
                publishing.cancel()
        if durable.done():
            durable.result()


class GroupCommit:
    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        store: StateStore,
        publisher: Publisher,
        outages: Outages,
        metrics: LoopMetrics,
        clock: Clock,
        acked: Callable[[int, Reaction], None],
        sink: DurableSink | None = None,
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.store = store
        self.publisher = publisher
        self.outages = outages
        self.metrics = metrics
        self.clock = clock
        self.acked = acked  # told of each group once acked
        self.sink = sink
        self._open: _Group | None = None  # the last group, while it takes batches
        self._last: _Group | None = None  # the last group, until its write was learnt
        self._unacked: deque[_Group] = deque()  # every group not yet acked, oldest first
        self._unacked_messages = 0
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
        # What may wait unacked (and run again after a crash): two full groups, however
        # many groups hold them.
        self._most_unacked = 2 * self._full_at

    def next_write_at(self) -> float:
        """Monotonic time from which the next group may be written, unless it is due."""
        return self._last_write_at + self.settings.commit_interval_ms / 1000

    def last_ended(self) -> bool:
        """Whether the last group's write ended (`settle` then says how)."""
        last = self._last
        return last is not None and last.durable is not None and last.durable.done()

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
            group = _Group(list(batch), reaction, before=self._last)
            group.durable = asyncio.ensure_future(self._write(group))
            self._open = self._last = group
            self._unacked.append(group)
        self._unacked_messages += len(batch)
        full_bytes = self._full_bytes
        if full_bytes is not None:
            group.size += sum(len(message.body) for message in batch)
        if len(group.messages) >= self._full_at or (
            full_bytes is not None and group.size >= full_bytes
        ):
            group.due.set()
        while self._unacked_messages >= self._most_unacked and self._unacked:
            oldest = self._unacked[0]
            oldest.due.set()
            assert oldest.durable is not None
            await oldest.durable  # until the oldest group is acked (or raises why not)

    async def settle(self) -> None:
        """Make every handled batch durable now and wait until it is acked; raises what
        that raised."""
        last = self._last
        if self._open is not None:
            self._open.due.set()
            self._open = None
        if last is not None and last.durable is not None:
            await last.durable  # acked only after every group before it
        if self._last is last:  # kept if it failed: `abandon` still reaches every group
            self._last = None

    async def abandon(self) -> None:
        """Drop the groups not yet acked (they will be redelivered): each one's write is
        cancelled (a group waiting for the one before it to publish does not cancel it)."""
        writes = [group.durable for group in self._unacked if group.durable is not None]
        self._last, self._open = None, None
        self._unacked.clear()
        self._unacked_messages = 0
        for write in writes:
            write.cancel()
        await asyncio.gather(*writes, return_exceptions=True)

    async def _write(self, group: _Group) -> None:
        """Once the group before published and the interval passed (or the group is due):
        publish; once the group before is acked: checkpoint, then ack."""
        before = group.before
        if before is not None:
            await before.wait_published()  # events go out in group order
            two_back = before.before  # None once acked
            if two_back is not None and two_back.durable is not None:
                await two_back.durable  # two groups written at once at most: this one
                # stays open meanwhile, and the loop waits once it is full
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
            await self.publisher.publish(reaction, self.outages)
        group.published.set()
        if before is not None and before.durable is not None:
            await before.durable  # its checkpoint and ack first; raises what it raised
        group.before = None  # acked: not kept in memory along a chain of groups
        if reaction.processed or reaction.states or reaction.progress:
            started = self.clock.monotonic()
            await self.outages.until_done("checkpoint", lambda: self._checkpoint(reaction))
            self.metrics.checkpoint_duration.record(self.clock.monotonic() - started)
        if self.sink is not None:
            await self.sink.write(batch, self.outages)
        await self.outages.until_done("ack", lambda: self.broker.ack(batch))
        if self._unacked and self._unacked[0] is group:  # else abandoned meanwhile
            self._unacked.popleft()
            self._unacked_messages -= len(batch)
        self.acked(len(batch), reaction)

    async def _checkpoint(self, reaction: Reaction) -> None:
        """One store write per stream, all at once."""
        await all_or_raise(self.store.commit(checkpoint) for checkpoint in reaction.checkpoints())
