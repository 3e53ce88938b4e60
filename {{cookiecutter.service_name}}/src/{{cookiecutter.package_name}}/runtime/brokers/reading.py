"""Reading a bus without consuming it for good, for the operator commands (tail, dlq,
replay): no consumer-group commits on Kafka, no acks that lose a message on RabbitMQ.

A reader wraps the adapter's Broker (which publishes what a redrive or a replay sends)
and adds what reading needs: its own subscription, history by time, the dead-letter
destination browsed and, for a redrive, settled (acked or its progress recorded).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from ..config import Settings
from ..errors import ConfigError
from .base import Broker, InboundMessage

# Where a read starts: the end (only what arrives from now on), the beginning of what the
# bus keeps, or the first message at or after a time.
Start = Literal["end", "beginning"] | datetime


@dataclass(frozen=True, slots=True)
class Record:
    """A message read, with the time the bus took it where the bus says (Kafka)."""

    message: InboundMessage
    at: datetime | None = None


@dataclass(slots=True)
class Reading:
    """Records in bus order; `total`: how many there are to read, where known."""

    records: AsyncIterator[Record]
    total: int | None = None


class BusReader(ABC):
    """Reads topics and the dead-letter destination; `broker` publishes."""

    # Whether the bus keeps what it delivered, so a read may start in the past (Kafka).
    keeps_history: bool = True

    def __init__(self, settings: Settings, broker: Broker) -> None:
        self.settings = settings
        self.broker = broker

    async def start(self) -> None:
        """Connect (publishing included)."""
        await self.broker.start([])

    async def close(self) -> None:
        """Disconnect; parked messages read and not settled stay where they were."""
        await self.broker.close()

    @abstractmethod
    async def read(
        self, event_types: Sequence[str], start: Start, until: datetime | None, *, follow: bool
    ) -> Reading:
        """Messages of `event_types` from `start`: with `follow`, also those that
        arrive later, until `until` passes; without, up to what the bus held when asked
        (and before `until`). Reads only: no group commit, no ack."""

    @abstractmethod
    async def parked(
        self, event_types: Sequence[str], resume: str | None = None, bound: int | None = None
    ) -> Reading:
        """The dead-letter destination of the topics of `event_types` (where the bus has
        one per topic), oldest first, without consuming it. `resume` names
        a redrive whose recorded progress to start from (Kafka); `bound`: read at most
        this many (RabbitMQ holds each one read until the reader closes)."""

    @abstractmethod
    async def settle(self, read: Sequence[Record], redriven: Sequence[Record]) -> None:
        """A redrive is done with `read` (parked messages it read, in order), of which it
        re-published `redriven` (confirmed by the bus): RabbitMQ acks those; Kafka records
        the redrive's progress past `read` (the destination is never rewritten)."""


def no_history(what: str) -> ConfigError:
    """The one line a bus without history (RabbitMQ) answers a read of the past with."""
    return ConfigError(
        f"{what} needs the bus's history, and RabbitMQ keeps none (a queue forgets what it "
        "delivered): replay from the archive instead (`replay --from-archive`, a later "
        "version)"
    )
