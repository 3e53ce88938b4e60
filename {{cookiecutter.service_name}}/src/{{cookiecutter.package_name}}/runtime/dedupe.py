"""The dedupe window: ids handled recently, bounded by count and by age."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class DedupeWindow:
    """Insertion-ordered ids with the time they were recorded; the oldest leave first."""

    def __init__(self, max_ids: int, ttl_s: float) -> None:
        self.max_ids = max_ids
        self.ttl_s = ttl_s
        self._seen: OrderedDict[str, float] = OrderedDict()

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, records: Iterable[tuple[str, float]], now: float) -> None:
        for event_id, recorded_at in records:
            self._seen[event_id] = recorded_at
            self._seen.move_to_end(event_id)
        self.expire(now)

    def expire(self, now: float) -> None:
        seen = self._seen
        while len(seen) > self.max_ids:
            seen.popitem(last=False)
        oldest_allowed = now - self.ttl_s
        while seen:
            event_id, recorded_at = next(iter(seen.items()))
            if recorded_at >= oldest_allowed:
                break
            del seen[event_id]

    def items(self) -> list[tuple[str, float]]:
        return list(self._seen.items())
