"""State kept in this process: survives loop restarts within it, not process restarts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from ..dedupe import DedupeWindow
from .base import StateStore, StateUnavailable


class MemoryStateStore(StateStore):
    def __init__(self, max_ids: int, ttl_s: float, clock: Callable[[], float]) -> None:
        self._max_ids = max_ids
        self._ttl_s = ttl_s
        self._clock = clock
        self._streams: dict[str, DedupeWindow] = {}
        self._failures = 0
        self.commits = 0

    def fail_next_commits(self, count: int) -> None:
        """Make the next `count` commits fail, as a store outage would."""
        self._failures = count

    async def open(self) -> None:
        return None

    async def load(self, stream: str) -> list[tuple[str, float]]:
        window = self._streams.get(stream)
        if window is None:
            return []
        window.expire(self._clock())
        return window.items()

    async def commit(self, stream: str, processed: Sequence[tuple[str, float]]) -> None:
        if self._failures:
            self._failures -= 1
            raise StateUnavailable("memory store: injected commit failure")
        window = self._streams.setdefault(stream, DedupeWindow(self._max_ids, self._ttl_s))
        window.add(processed, self._clock())
        self.commits += 1

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
