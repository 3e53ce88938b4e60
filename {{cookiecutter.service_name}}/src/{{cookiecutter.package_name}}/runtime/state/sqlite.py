"""Embedded state store: SQLite in a local file, so a single node keeps its dedupe records
across restarts without any server. `STATE_URL=sqlite:///var/lib/service/state.db`."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ParamSpec, TypeVar
from urllib.parse import urlsplit

from ..errors import ConfigError
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

P = ParamSpec("P")
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS processed (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    event_id TEXT NOT NULL,
    recorded_at REAL NOT NULL,
    UNIQUE (stream, event_id) ON CONFLICT REPLACE
);
CREATE INDEX IF NOT EXISTS processed_by_age ON processed (stream, recorded_at);
CREATE TABLE IF NOT EXISTS fences (stream TEXT PRIMARY KEY, token INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS progress (stream TEXT PRIMARY KEY, position INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS key_state (
    stream TEXT NOT NULL,
    key TEXT NOT NULL,
    state BLOB NOT NULL,
    version INTEGER NOT NULL,
    written_at REAL NOT NULL,
    empty INTEGER NOT NULL,
    PRIMARY KEY (stream, key)
);
"""


def path_of(url: str) -> Path:
    """sqlite:///abs/path.db or sqlite://relative/path.db -> Path."""
    parts = urlsplit(url)
    path = parts.netloc + parts.path
    if not path:
        raise ConfigError(f"STATE_URL {url!r}: give a file, e.g. sqlite:///var/lib/app/state.db")
    return Path(path)


class SqliteStateStore(StateStore):
    """One connection, used from a worker thread so the event loop never blocks on disk."""

    def __init__(self, path: Path, max_ids: int, ttl_s: float, clock: Callable[[], float]) -> None:
        self.path = path
        self.max_ids = max_ids
        self.ttl_s = ttl_s
        self.clock = clock
        self._connection: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        if self._connection is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")  # a committed batch survives power loss
        connection.executescript(SCHEMA)
        self._connection = connection

    async def take_over(self, stream: str) -> Fence:
        return Fence(stream, await self._run(self._take_over, stream))

    def _take_over(self, stream: str) -> int:
        assert self._connection is not None
        with self._connection:
            self._connection.execute("BEGIN IMMEDIATE")
            self._connection.execute(
                "INSERT INTO fences (stream, token) VALUES (?, 1) "
                "ON CONFLICT (stream) DO UPDATE SET token = token + 1",
                (stream,),
            )
            return int(self._fence(stream))

    def _fence(self, stream: str) -> int:
        assert self._connection is not None
        row = self._connection.execute(
            "SELECT token FROM fences WHERE stream = ?", (stream,)
        ).fetchone()
        return int(row[0]) if row else 0

    async def load(self, stream: str, after: int = 0) -> Loaded:
        return await self._run(self._load, stream, after)

    def _load(self, stream: str, after: int) -> Loaded:
        assert self._connection is not None
        self._expire(stream)
        rows = self._connection.execute(
            "SELECT seq, event_id, recorded_at FROM processed "
            "WHERE stream = ? AND seq > ? ORDER BY seq",
            (stream, after),
        ).fetchall()
        cursor = max((int(seq) for seq, _, _ in rows), default=after)
        progress = self._connection.execute(
            "SELECT position FROM progress WHERE stream = ?", (stream,)
        ).fetchone()
        records = [(str(event_id), float(at)) for _, event_id, at in rows]
        return Loaded(records, cursor, int(progress[0]) if progress else None)

    async def load_states(self, stream: str, keys: Sequence[str]) -> dict[str, KeyState]:
        return await self._run(self._load_states, stream, keys)

    def _load_states(self, stream: str, keys: Sequence[str]) -> dict[str, KeyState]:
        found = {key: KeyState() for key in keys}
        for key, (state, version) in self._stored_states(stream, keys).items():
            found[key] = KeyState.decode(state, version)
        return found

    def _stored_states(self, stream: str, keys: Sequence[str]) -> dict[str, tuple[bytes, int]]:
        assert self._connection is not None
        stored: dict[str, tuple[bytes, int]] = {}
        for start in range(0, len(keys), 500):  # SQLite caps bound parameters per statement
            chunk = list(keys[start : start + 500])
            marks = ",".join("?" * len(chunk))
            rows = self._connection.execute(
                f"SELECT key, state, version FROM key_state WHERE stream = ? AND key IN ({marks})",
                [stream, *chunk],
            )
            stored.update((str(key), (bytes(state), int(version))) for key, state, version in rows)
        return stored

    async def commit(self, checkpoint: Checkpoint) -> None:
        await self._run(self._commit, checkpoint)

    def _commit(self, checkpoint: Checkpoint) -> None:
        assert self._connection is not None
        stream, fence, states = checkpoint.stream, checkpoint.fence, checkpoint.states
        recorded_at, progress = checkpoint.recorded_at, checkpoint.progress
        with self._connection:  # one transaction per group of batches
            self._connection.execute("BEGIN IMMEDIATE")
            if fence is not None and self._fence(stream) != fence.token:
                raise Fenced(stream)
            stored = self._stored_states(stream, list(states))
            if fence is None:
                for key, new in states.items():
                    if stored.get(key, (b"", 0))[1] != new.version:
                        raise Conflict(stream, key)
            self._connection.executemany(
                "INSERT INTO processed (stream, event_id, recorded_at) VALUES (?, ?, ?)",
                [(stream, event_id, recorded_at) for event_id in checkpoint.ids],
            )
            self._connection.executemany(
                "INSERT OR REPLACE INTO key_state VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        stream,
                        key,
                        new.encode(),
                        stored.get(key, (b"", 0))[1] + 1,
                        self.clock(),
                        new.value is None,
                    )
                    for key, new in states.items()
                ],
            )
            if progress is not None:
                self._connection.execute(
                    "INSERT OR REPLACE INTO progress VALUES (?, ?)", (stream, progress)
                )
            self._expire(stream)

    def _expire(self, stream: str) -> None:
        """Drop ids past the horizon (older than the TTL, or beyond the newest max_ids),
        and emptied key states once their applied ids are past it too."""
        assert self._connection is not None
        self._connection.execute(
            "DELETE FROM processed WHERE stream = ? AND recorded_at < ?",
            (stream, self.clock() - self.ttl_s),
        )
        self._connection.execute(
            "DELETE FROM key_state WHERE stream = ? AND empty AND written_at < ?",
            (stream, self.clock() - self.ttl_s),
        )
        self._connection.execute(
            """DELETE FROM processed WHERE stream = ? AND seq <= (
                   SELECT seq FROM processed WHERE stream = ?
                   ORDER BY seq DESC LIMIT 1 OFFSET ?)""",
            (stream, stream, self.max_ids),
        )

    async def close(self) -> None:
        if self._connection is not None:
            await self._run(self._connection.close)
            self._connection = None

    async def _run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        async with self._lock:
            try:
                return await asyncio.to_thread(function, *args, **kwargs)
            except sqlite3.Error as error:
                raise StateUnavailable(f"sqlite {self.path}: {error}") from error
