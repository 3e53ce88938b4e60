"""State stores, chosen by STATE_URL's scheme."""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import urlsplit

from ..config import Settings
from .base import Checkpoint, Conflict, Fence, Fenced, Loaded, StateStore, StateUnavailable
from .memory import MemoryStateStore, store_for_url
from .sqlite import SqliteStateStore, path_of

__all__ = [
    "Checkpoint",
    "Conflict",
    "Fence",
    "Fenced",
    "Loaded",
    "MemoryStateStore",
    "SqliteStateStore",
    "StateStore",
    "StateUnavailable",
    "open_state_store",
]


def open_state_store(settings: Settings, clock: Callable[[], float] = time.time) -> StateStore:
    # Config validation admits only schemes implemented here (see config.STATE_SCHEMES).
    url, max_ids, ttl_s = settings.state_url, settings.dedupe_max_ids, settings.dedupe_ttl_s
    if urlsplit(url).scheme == "sqlite":
        return SqliteStateStore(path_of(url), max_ids, ttl_s, clock)
    if urlsplit(url).scheme == "etcd":
        from .etcd import open_store  # imports aetcd/grpc only when etcd is used

        return open_store(settings, clock)
    return store_for_url(url, max_ids, ttl_s, clock)
