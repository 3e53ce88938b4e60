"""State kept in this process: survives loop restarts within it, not process restarts."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .base import (
    Checkpoint,
    Conflict,
    Fence,
    Fenced,
    KeyState,
    Loaded,
    StateStore,
    StateUnavailable,
)


@dataclass
class _Stream:
    # event id -> (recorded at, sequence number); oldest first
    records: OrderedDict[str, tuple[float, int]] = field(default_factory=OrderedDict)
    fence: int = 0
    progress: int | None = None
    states: dict[str, KeyState] = field(default_factory=dict)


class MemoryStateStore(StateStore):
    def __init__(self, max_ids: int, ttl_s: float, clock: Callable[[], float]) -> None:
        self._max_ids = max_ids
        self._ttl_s = ttl_s
        self._clock = clock
        self._streams: dict[str, _Stream] = {}
        self._sequence = itertools.count(1)
        self._failures = 0
        self.commits = 0

    def fail_next_commits(self, count: int) -> None:
        """Make the next `count` commits fail, as a store outage would."""
        self._failures = count

    async def open(self) -> None:
        return None

    async def take_over(self, stream: str) -> Fence:
        state = self._streams.setdefault(stream, _Stream())
        state.fence += 1
        return Fence(stream, state.fence)

    async def load(self, stream: str, after: int = 0) -> Loaded:
        state = self._streams.setdefault(stream, _Stream())
        self._expire(state)
        records = [(i, at) for i, (at, seq) in state.records.items() if seq > after]
        cursor = max((seq for _, seq in state.records.values()), default=after)
        return Loaded(records, cursor, state.progress)

    async def load_states(self, stream: str, keys: Sequence[str]) -> dict[str, KeyState]:
        states = self._streams.setdefault(stream, _Stream()).states
        return {key: states.get(key, KeyState()) for key in keys}

    async def commit(self, checkpoint: Checkpoint) -> None:
        if self._failures:
            self._failures -= 1
            raise StateUnavailable("memory store: injected commit failure")
        stream, fence = checkpoint.stream, checkpoint.fence
        state = self._streams.setdefault(stream, _Stream())
        if fence is not None and fence.token != state.fence:
            raise Fenced(stream)
        for key, new in checkpoint.states.items():
            if fence is None and state.states.get(key, KeyState()).version != new.version:
                raise Conflict(stream, key)
        for event_id in checkpoint.ids:
            state.records[event_id] = (checkpoint.recorded_at, next(self._sequence))
            state.records.move_to_end(event_id)
        for key, new in checkpoint.states.items():
            state.states[key] = KeyState(new.value, new.applied, next(self._sequence))
        if checkpoint.progress is not None:
            state.progress = checkpoint.progress
        self._expire(state)
        self.commits += 1

    def _expire(self, state: _Stream) -> None:
        records = state.records
        while len(records) > self._max_ids:
            records.popitem(last=False)
        oldest_allowed = self._clock() - self._ttl_s
        while records and next(iter(records.values()))[0] < oldest_allowed:
            records.popitem(last=False)

    def count(self, stream: str) -> int:
        return len(self._streams.get(stream, _Stream()).records)

    async def close(self) -> None:
        return None


_STORES: dict[str, MemoryStateStore] = {}


def store_for_url(
    url: str, max_ids: int, ttl_s: float, clock: Callable[[], float]
) -> MemoryStateStore:
    """`memory://` is the process-wide store; `memory://name` a named one."""
    name = urlsplit(url).netloc
    if name not in _STORES:
        _STORES[name] = MemoryStateStore(max_ids, ttl_s, clock)
    return _STORES[name]
