"""Health without a port: the loop writes a heartbeat file, `healthcheck` reads it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

MIN_INTERVAL_S = 1.0


class Heartbeat:
    """Writes {"time": ..., "ready": ...} atomically, at most once a second unless `ready` flips."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._last_time = float("-inf")
        self._last_ready: bool | None = None

    def beat(self, *, ready: bool) -> None:
        now = self._clock()
        if ready == self._last_ready and now - self._last_time < MIN_INTERVAL_S:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        temporary.write_text(json.dumps({"time": now, "ready": ready, "pid": os.getpid()}))
        temporary.replace(self.path)
        self._last_time, self._last_ready = now, ready

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def check(
    path: Path, max_age_s: float, *, require_ready: bool, now: float | None = None
) -> str | None:
    """None when healthy, else a one-line reason."""
    try:
        beat = json.loads(path.read_text())
        age = (time.time() if now is None else now) - float(beat["time"])
        ready = bool(beat["ready"])
    except FileNotFoundError:
        return f"no heartbeat at {path}: the loop is not running"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable heartbeat at {path}: {error}"
    if age > max_age_s:
        return f"heartbeat is {age:.0f}s old (limit {max_age_s:.0f}s): the loop is stuck"
    if require_ready and not ready:
        return "not ready: the bus or the state store is unavailable"
    return None
