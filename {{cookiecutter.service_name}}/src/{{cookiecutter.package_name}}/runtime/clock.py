"""The loop's one clock."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Clock:
    """`wall` stamps what is stored (dedupe records; tests move it); `monotonic` measures
    and schedules. It is the event loop's own time (asyncio reads time.monotonic), so a
    deadline handed to `Broker.fetch_batch` means the same to the adapter."""

    wall: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
