"""Stream bookkeeping: what the loop knows of each stream (queue or partition) it consumes.

A stream is exclusive (a Kafka partition: one owner at a time, which fences earlier ones
in the store and checkpoints its progress) or shared (a RabbitMQ queue: competing
replicas, which learn each other's records from the store on redeliveries)."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial

import structlog

from .brokers.base import InboundMessage
from .clock import Clock
from .config import Settings
from .dedupe import DedupeWindow
from .reaction import Reaction
from .retry import Outages
from .state.base import Fence, KeyState, StateStore
from .stats import LoopStats

STATE_CACHE_KEYS = 10_000  # per exclusive stream; older keys are read again when needed
# Streams restored at once (each loads its whole dedupe window): a rebalance that assigns
# hundreds of partitions does not send the store hundreds of reads together.
RESTORES_AT_ONCE = 16


@dataclass(slots=True)
class StreamState:
    """One stream: its dedupe window, and for an exclusive stream the owner's fence, the
    next position not yet durable and the key states it knows (most recent last)."""

    window: DedupeWindow
    exclusive: bool
    fence: Fence | None = None
    cursor: int = 0  # shared: where the last look at other replicas' records ended
    progress: int = 0
    states: OrderedDict[str, KeyState] = field(default_factory=OrderedDict)
    # Keys whose state a batch not yet durable changed, with that batch's number: the
    # store is behind on them (and only on them) until it is.
    changing: dict[str, int] = field(default_factory=dict)

    def not_checkpointed(
        self, messages: Iterable[InboundMessage], reaction: Reaction
    ) -> Iterable[InboundMessage]:
        """An exclusive stream's messages below its checkpointed progress were handled
        before a crash cut their ack short: counted as duplicates, not decoded. Advances
        the reaction's progress past every message."""
        if not self.exclusive:  # no progress: ids alone tell
            return messages
        messages = list(messages)
        positions = [message.position for message in messages]
        stream, done = messages[0].stream, self.progress
        after = max(positions) + 1
        if after > reaction.progress.get(stream, done):
            reaction.progress[stream] = after
        if min(positions) >= done:  # the usual case: nothing was handled before
            return messages
        fresh = [message for message in messages if message.position >= done]
        reaction.duplicates += len(messages) - len(fresh)
        return fresh

    def cached_state(self, key: str) -> KeyState | None:
        """The key's state as this owner knows it; shared streams are read every batch
        (other replicas write them too)."""
        return self.states.get(key) if self.exclusive else None

    def store_is_behind(self, key: str) -> bool:
        """Whether a batch not yet durable changed the key's state."""
        return key in self.changing

    def remember_states(self, states: Mapping[str, KeyState]) -> None:
        """States read from the store, or changed by a batch: an exclusive stream's owner
        is the only writer, so they stay current."""
        if not self.exclusive:
            return
        cache = self.states
        for key, state in states.items():
            cache[key] = state
            cache.move_to_end(key)
        while len(cache) > STATE_CACHE_KEYS:
            cache.popitem(last=False)


class Streams:
    """Every stream this consumer holds, by name."""

    def __init__(
        self,
        store: StateStore,
        settings: Settings,
        clock: Clock,
        outages: Outages,
        log: structlog.typing.FilteringBoundLogger,
        stats: LoopStats,
        *,
        exclusive: bool,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.outages = outages
        self.log = log
        self.stats = stats
        self.exclusive = exclusive
        self._held: dict[str, StreamState] = {}
        self._batches = 0  # batches handled: numbers them (Reaction.last_batch)

    def __getitem__(self, stream: str) -> StreamState:
        return self._held[stream]

    def get(self, stream: str) -> StreamState | None:
        return self._held.get(stream)

    async def restore(self, streams: set[str]) -> None:
        """First sight of streams: RESTORES_AT_ONCE at a time (a rebalance may assign
        many), each one's earlier owners fenced and its dedupe records loaded."""
        new = sorted(streams - self._held.keys())
        if not new:
            return
        at_once = asyncio.Semaphore(RESTORES_AT_ONCE)
        restoring = [asyncio.ensure_future(self._restore(stream, at_once)) for stream in new]
        try:
            await asyncio.gather(*restoring)
        except BaseException:  # as it was raised; the others do not go on behind it
            for task in restoring:
                task.cancel()
            await asyncio.gather(*restoring, return_exceptions=True)
            raise

    async def _restore(self, stream: str, at_once: asyncio.Semaphore) -> None:
        until_done, store = self.outages.until_done, self.store
        async with at_once:
            started = self.clock.monotonic()
            fence = None
            if self.exclusive:
                fence = await until_done("take over", partial(store.take_over, stream))
            loaded = await until_done("restore", partial(store.load, stream))
        window = DedupeWindow(self.settings.dedupe_max_ids, self.settings.dedupe_ttl_s)
        window.add(loaded.records, self.clock.wall())
        self._held[stream] = StreamState(
            window, self.exclusive, fence, loaded.cursor, loaded.progress or 0
        )
        self.log.info(
            "restored",
            stream=stream,
            ids=len(window),
            progress=loaded.progress,
            seconds=round(self.clock.monotonic() - started, 4),
        )

    async def refresh(self, streams: set[str]) -> None:
        """Redeliveries on a shared stream: learn what other replicas recorded since."""
        for stream in sorted(streams):
            state = self._held[stream]
            if state.exclusive:
                continue  # nobody else writes it
            lookup = partial(self.store.load, stream, state.cursor)
            loaded = await self.outages.until_done("lookup", lookup)
            state.window.add(loaded.records, self.clock.wall())
            state.cursor = loaded.cursor
            self.stats.shared_lookups += 1

    def known_before_durable(self, reaction: Reaction) -> None:
        """What the next batch must see while `reaction` is still being made durable."""
        now = self.clock.wall()
        self._batches += 1
        reaction.last_batch = number = self._batches
        for stream, digests in reaction.digests.items():
            state = self._held.get(stream)
            if state is not None:  # else given up in a rebalance while being handled
                state.window.remember(digests, reaction.recorded_at, now)
        for stream, states in reaction.states.items():
            if (state := self._held.get(stream)) is not None:
                state.remember_states(states)
                state.changing.update(dict.fromkeys(states, number))

    def durable(self, reaction: Reaction) -> None:
        """A group's checkpoint is written and its messages acked."""
        for stream, position in reaction.progress.items():
            state = self._held.get(stream)
            if state is not None:  # still ours (a rebalance may have taken it)
                state.progress = position
        last = reaction.last_batch
        for stream, states in reaction.states.items():
            if (state := self._held.get(stream)) is not None:
                changing = state.changing
                for key in states:  # unless a later batch changed it again
                    if (number := changing.get(key)) is not None and number <= last:
                        del changing[key]

    def forget(self, streams: Iterable[str] | None = None) -> None:
        """Streams given up (all when None): their next owner restores them from the store."""
        if streams is None:
            self._held.clear()
        for stream in streams or ():
            self._held.pop(stream, None)
