"""State stores, chosen by STATE_URL's scheme."""

from __future__ import annotations

import time
from collections.abc import Callable

from ..config import Settings
from .base import StateStore, StateUnavailable
from .memory import MemoryStateStore, store_for_url

__all__ = ["MemoryStateStore", "StateStore", "StateUnavailable", "open_state_store"]


def open_state_store(settings: Settings, clock: Callable[[], float] = time.time) -> StateStore:
    # Config validation admits only schemes implemented here (see config.STATE_SCHEMES).
    return store_for_url(settings.state_url, settings.dedupe_max_ids, settings.dedupe_ttl_s, clock)
