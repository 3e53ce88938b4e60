"""The dedupe window: ids handled recently, bounded by count and by age.

Memory is what bounds a window of a million ids, so ids are not kept as strings: each is
a 128-bit XXH3 digest in one set, and ids recorded together share a bucket holding their
time (about 90 bytes per remembered id; docs/performance.md). A collision between two ids
would need ~2^64 ids in one window; a false "duplicate" is not a practical risk.

Digests never leave the process (stores keep the ids themselves, and a restart rebuilds
the window from them), so each process seeds the hash with a secret of its own: ids that
collide cannot be prepared from outside.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import groupby

from xxhash import xxh3_128_digest

BUCKET_IDS = 1024  # ids per bucket at most: the age horizon drops whole buckets
_SEED = secrets.randbits(64)


def digest(event_id: str) -> bytes:
    """The 128-bit form an id is remembered as (in this process)."""
    return xxh3_128_digest(event_id.encode(), _SEED)


class _Bucket:
    """Ids recorded within one second, oldest first; `at` is the newest time among them
    (so a bucket leaves no earlier than its last id should); `start` skips trimmed ids."""

    __slots__ = ("at", "ids", "start")

    def __init__(self, at: float) -> None:
        self.at = at
        self.ids: list[bytes] = []
        self.start = 0


class DedupeWindow:
    """Remembered ids, oldest leaving first: beyond `max_ids`, or older than `ttl_s`."""

    def __init__(self, max_ids: int, ttl_s: float) -> None:
        self.max_ids = max_ids
        self.ttl_s = ttl_s
        self._ids: set[bytes] = set()
        self._buckets: deque[_Bucket] = deque()
        # Whether a digest is remembered: asked once per event, so the set's own C method.
        self.has: Callable[[bytes], bool] = self._ids.__contains__

    def __contains__(self, event_id: object) -> bool:
        return isinstance(event_id, str) and digest(event_id) in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, records: Iterable[tuple[str, float]], now: float) -> None:
        """Remember (id, recorded_at) pairs, given oldest first (a restore, a lookup)."""
        for _, same_second in groupby(records, key=lambda record: int(record[1])):
            pairs = list(same_second)
            self._put([digest(event_id) for event_id, _ in pairs], max(at for _, at in pairs))
        self.expire(now)

    def remember(self, digests: Sequence[bytes], recorded_at: float, now: float) -> None:
        """Remember digests recorded together (one batch of one stream)."""
        self._put(digests, recorded_at)
        self.expire(now)

    def _put(self, digests: Sequence[bytes], recorded_at: float) -> None:
        ids, buckets = self._ids, self._buckets
        fresh = [event_digest for event_digest in dict.fromkeys(digests) if event_digest not in ids]
        ids.update(fresh)
        start = 0
        while start < len(fresh):
            if (
                not buckets
                or len(buckets[-1].ids) >= BUCKET_IDS
                or int(recorded_at) > int(buckets[-1].at)
            ):
                buckets.append(_Bucket(recorded_at))
            bucket = buckets[-1]
            end = start + BUCKET_IDS - len(bucket.ids)
            bucket.ids.extend(fresh[start:end])
            bucket.at = max(bucket.at, recorded_at)
            start = end

    def expire(self, now: float) -> None:
        ids, buckets = self._ids, self._buckets
        oldest_allowed = now - self.ttl_s
        while buckets and buckets[0].at < oldest_allowed:
            bucket = buckets.popleft()
            ids.difference_update(bucket.ids[bucket.start :])
        while len(ids) > self.max_ids:
            bucket = buckets[0]
            ids.discard(bucket.ids[bucket.start])
            bucket.start += 1
            if bucket.start == len(bucket.ids):
                buckets.popleft()


# Redrive generations. An operator's redrive (`dlq redrive`, `replay --reprocess`) asks
# one consumer group to handle an event again although its id is in the dedupe window:
# the copy it re-publishes carries this header, "<group>#<generation>". For that group the
# event's dedupe id is "<id>#redrive-<generation>", a new id once; every other group (and a
# header naming no group of ours) keeps the plain id, so they drop the copy as before. The
# generation is one past the copy it was made from, so re-publishing one parked message
# twice (the same redrive run again, or resumed after a crash) gives the same dedupe id:
# the handler runs once per redrive. Emitted events keep ids derived from the event's own
# id, so the next service drops what a re-run emits again.
REDRIVE_HEADER = "x-redrive"


def _generation(value: str, group: str) -> int:
    """The generation `value` (a REDRIVE_HEADER) asks of `group`; 0 when it names another."""
    target, _, generation = value.rpartition("#")
    return int(generation) if target == group and generation.isdigit() else 0


def redriven_id(event_id: str, value: str, group: str) -> str:
    """The id `group` dedupes an event by when it carries REDRIVE_HEADER `value`."""
    generation = _generation(value, group)
    return f"{event_id}#redrive-{generation}" if generation else event_id


def next_redrive(headers: Mapping[str, str], group: str) -> str:
    """The REDRIVE_HEADER asking `group` to handle once more the copy with `headers`."""
    return f"{group}#{_generation(headers.get(REDRIVE_HEADER, ''), group) + 1}"
