"""The state store interface: durable dedupe records per stream (queue or partition).

A stream's records are written by group commit (one write per stream per group of
batches). Two kinds of stream exist:
- exclusive (a Kafka partition): one owner at a time. The owner calls `take_over`, which
  fences out earlier owners: their commits fail with `Fenced` from then on.
- shared (a RabbitMQ queue with competing replicas): no owner, no fencing; replicas see
  each other's records through `load(stream, after=cursor)`, and a commit whose key
  state another replica changed meanwhile fails with `Conflict`.

Besides the ids, a `Checkpoint` carries the stream's progress (the next Kafka offset) and
the handlers' per-key state (`ctx.state`), so restart resumes exactly where the last
durable batch ended. Each key's stored state names the events that produced it (`applied`): when
a store must split a large commit, a crash between the parts cannot make a redelivered
event apply twice to a key's state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from .encoding import decode_json, encode_json


class StateUnavailable(Exception):
    """The store did not confirm a read or write; the loop retries and does not ack."""


class Fenced(Exception):
    """Another instance took the stream over: this one must not write for it any more."""

    def __init__(self, stream: str) -> None:
        super().__init__(f"stream {stream} was taken over by another instance")
        self.stream = stream


class Conflict(Exception):
    """A shared stream's key state changed under this replica (another one wrote it): the
    replica's batches must run again on the newer state. Not fencing: nobody owns the
    stream, and this replica goes on consuming it."""

    def __init__(self, stream: str, key: str) -> None:
        super().__init__(f"state of key {key!r} in {stream} changed under this replica")
        self.stream = stream
        self.key = key


@dataclass(frozen=True, slots=True)
class Fence:
    """An exclusive stream's owner token, from `take_over`: commits present it, and fail
    with Fenced once a newer owner took the stream over."""

    stream: str
    token: int


@dataclass(frozen=True, slots=True)
class Loaded:
    """Records of a stream (oldest first), the cursor to continue from later, and the
    stream's checkpointed progress (next position to consume; None if never written)."""

    records: list[tuple[str, float]]
    cursor: int
    progress: int | None = None


class KeyState(NamedTuple):
    """One key's handler state as stored.

    `value` is JSON (None: no state), `applied` the ids of the events whose handling
    produced it, `version` what the store compares on commit for shared streams (0: the
    key had no stored state when read). A named tuple: several are made per changed key
    and batch, and a frozen dataclass takes two to three times as long to make.
    """

    value: bytes | None = None
    applied: tuple[str, ...] = ()
    version: int = 0

    def encode(self) -> bytes:
        """The stored form: {"v": <value or null>, "a": [applied ids]}."""
        value = b"null" if self.value is None else self.value
        return b'{"v":' + value + b',"a":' + encode_json(self.applied) + b"}"

    @classmethod
    def decode(cls, stored: bytes, version: int) -> KeyState:
        data = decode_json(stored)
        value = data.get("v")
        encoded = None if value is None else encode_json(value)
        return cls(encoded, tuple(data.get("a", ())), version)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What a group of batches did to one stream, written in one store write where the
    store's limits allow: the ids handled since the last checkpoint (all recorded at
    `recorded_at`), the progress (next position to consume; exclusive streams) and each
    changed key's new state. `fence` is the owner's (exclusive streams) or None (shared
    ones: then each state's `version` must still match the stored one)."""

    stream: str
    ids: Sequence[str] = ()
    recorded_at: float = 0.0
    fence: Fence | None = None
    progress: int | None = None
    states: Mapping[str, KeyState] = field(default_factory=dict)


class StateStore(ABC):
    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def take_over(self, stream: str) -> Fence:
        """Become the stream's only writer; returns the fence its checkpoints present."""

    @abstractmethod
    async def load(self, stream: str, after: int = 0) -> Loaded:
        """Records of `stream` within the horizon; with `after`, only those newer than
        that cursor (what other replicas recorded since)."""

    @abstractmethod
    async def load_states(self, stream: str, keys: Sequence[str]) -> dict[str, KeyState]:
        """The stored handler state of each key (an empty KeyState if none), in one read."""

    @abstractmethod
    async def commit(self, checkpoint: Checkpoint) -> None:
        """Durably record `checkpoint`. Raises StateUnavailable (retry later), Fenced (stop
        writing this stream) or Conflict (a shared stream's key state changed meanwhile)."""

    @abstractmethod
    async def close(self) -> None: ...
