"""What a loop did, counted as it went (`ConsumerLoop.stats`; the `stopped` log line)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class LoopStats:
    received: int = 0
    handled: int = 0
    duplicates: int = 0
    retries: int = 0
    emitted: int = 0
    unrouted: int = 0  # emitted events no consumer was bound for (parked, see the broker)
    acked: int = 0
    batches: int = 0
    shared_lookups: int = 0
    fenced: int = 0  # times unacked work was dropped to rejoin (fenced, or a conflict)
    conflicts: int = 0  # of those, key-state conflicts on a shared stream
    dead_lettered: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, object]:
        names = ("received", "handled", "duplicates", "retries", "emitted", "acked")
        summary: dict[str, object] = {name: getattr(self, name) for name in names}
        summary["dead_lettered"] = dict(self.dead_lettered)
        return summary
