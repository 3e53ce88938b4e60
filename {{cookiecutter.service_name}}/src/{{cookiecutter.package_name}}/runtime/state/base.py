"""The state store interface: durable dedupe records per stream (queue or partition).

A stream's records are written by group commit (one write per stream per batch). Two
kinds of stream exist:
- exclusive (a Kafka partition): one owner at a time. The owner calls `take_over`, which
  fences out earlier owners: their commits fail with `Fenced` from then on.
- shared (a RabbitMQ queue with competing replicas): no owner, no fencing; replicas see
  each other's records through `load(stream, after=cursor)`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass


class StateUnavailable(Exception):
    """The store did not confirm a read or write; the loop retries and does not ack."""


class Fenced(Exception):
    """Another instance took the stream over: this one must not write for it any more."""

    def __init__(self, stream: str) -> None:
        super().__init__(f"stream {stream} was taken over by another instance")
        self.stream = stream


@dataclass(frozen=True, slots=True)
class Loaded:
    """Records of a stream (oldest first) and the cursor to continue from later."""

    records: list[tuple[str, float]]
    cursor: int


class StateStore(ABC):
    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def take_over(self, stream: str) -> int:
        """Become the stream's only writer; returns the fence token commits must present."""

    @abstractmethod
    async def load(self, stream: str, after: int = 0) -> Loaded:
        """Records of `stream` within the horizon; with `after`, only those newer than
        that cursor (what other replicas recorded since)."""

    @abstractmethod
    async def commit(
        self, stream: str, processed: Sequence[tuple[str, float]], fence: int | None
    ) -> None:
        """Durably record ids handled since the last commit, in one write.

        `fence` is the token from `take_over` (exclusive streams) or None (shared ones).
        Raises StateUnavailable (retry later) or Fenced (stop writing this stream).
        """

    @abstractmethod
    async def close(self) -> None: ...
