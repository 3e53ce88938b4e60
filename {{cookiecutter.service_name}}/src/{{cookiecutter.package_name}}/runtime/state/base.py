"""The state store interface: durable dedupe records per stream (queue or partition)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence


class StateUnavailable(Exception):
    """The store did not confirm a write; the loop must not ack."""


class StateStore(ABC):
    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def load(self, stream: str) -> list[tuple[str, float]]:
        """The (event id, recorded at) pairs remembered for `stream`, oldest first."""

    @abstractmethod
    async def commit(self, stream: str, processed: Sequence[tuple[str, float]]) -> None:
        """Durably record ids handled since the last commit. Raises StateUnavailable."""

    @abstractmethod
    async def close(self) -> None: ...
