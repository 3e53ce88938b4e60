"""`<service> archive`: the platform's archiver, a run mode of every service. The same
consume loop and guarantees, with one difference: instead of handlers, each group of
batches is written as Parquet files (files.py) before it is acked (group commit's
durable step). A file therefore rotates by age (ARCHIVE_FILE_MAX_AGE_S is the group
commit interval), by size (ARCHIVE_FILE_MAX_BYTES, ARCHIVE_FILE_MAX_EVENTS make a group
due) and at a stop. A crash before the ack redelivers the group: it is written again
(duplicates in the files are removed by id when read)."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Sequence
from datetime import UTC, datetime

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..app import build_loop
from ..brokers import Broker, open_broker
from ..brokers.base import InboundMessage
from ..config import ENV_PREFIX, Settings, load_model
from ..health import Heartbeat
from ..loop import ConsumerLoop
from ..objectstore import ObjectStore
from ..retry import Outages
from ..router import Router
from .files import file_name, parquet_bytes, partitioned


class ArchiveSettings(BaseSettings):
    """The `archive` run mode (BROKER_URL and ARCHIVE_URL as for every command)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    archive_group: str = Field(
        "event-archive", description="Archiver's Kafka group / RabbitMQ queue (bound to #)"
    )
    archive_topics: str = Field(
        ".*", description="Kafka: regular expression of the topics archived (all by default)"
    )
    archive_dead_letters: bool = Field(
        False, description="Kafka: archive *.dlq topics too (excluded by default)"
    )
    archive_file_max_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="Rotate: write the files once this many bytes came"
    )
    archive_file_max_events: int = Field(
        100_000, gt=0, description="Rotate: write the files once this many events came"
    )
    archive_file_max_age_s: float = Field(
        60.0, gt=0, description="Rotate: write the files at least this often (unacked meanwhile)"
    )
    archive_writer: str = Field(
        socket.gethostname(), description="Writer name in file names (the pod's, by default)"
    )

    @field_validator("archive_topics")
    @classmethod
    def _topics(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"not a regular expression: {error}") from None
        return value

    def topic_pattern(self, settings: Settings) -> re.Pattern[str]:
        """The topics archived: ARCHIVE_TOPICS under TOPIC_PREFIX, dead letters excluded
        unless asked."""
        pattern = re.escape(settings.topic_prefix) + f"(?:{self.archive_topics})"
        if not self.archive_dead_letters:
            pattern = r"(?!.*\.dlq$)" + pattern
        return re.compile(pattern + "$")

    def loop_settings(self, settings: Settings) -> Settings:
        """The loop's settings in archive mode: its own group, the rotation age as the
        group commit interval, and no state store (nothing is deduplicated on the way in)."""
        return settings.model_copy(
            update={
                "consumer_group": self.archive_group,
                "commit_interval_ms": int(self.archive_file_max_age_s * 1000),
                "state_url": "memory://archive",  # a store of its own, even in tests
            }
        )


def load_archive_settings() -> ArchiveSettings:
    return load_model(ArchiveSettings)


class ArchiveSink:
    """Group commit's durable step in archive mode: a group's messages become files."""

    def __init__(self, store: ObjectStore, archive: ArchiveSettings) -> None:
        self.store = store
        self.writer = archive.archive_writer
        self.full_at = archive.archive_file_max_events
        self.full_bytes = archive.archive_file_max_bytes
        self.files_written = 0

    async def write(self, messages: Sequence[InboundMessage], outages: Outages) -> None:
        """Write `messages` as one file per partition; returns once every file is stored
        (an unavailable store is retried, only the files not yet stored)."""
        if not messages:
            return
        files = await asyncio.to_thread(self._files, messages, datetime.now(UTC))
        await outages.until_done("archive", lambda: self._put_all(files))

    def _files(self, messages: Sequence[InboundMessage], now: datetime) -> dict[str, bytes]:
        return {
            f"{partition.folder()}/{file_name(self.writer, columns.first_position())}": (
                parquet_bytes(columns)
            )
            for partition, columns in partitioned(messages, now, self.writer).items()
        }

    async def _put_all(self, files: dict[str, bytes]) -> None:
        """Store the files at once; those stored are removed from `files`."""
        paths = list(files)
        outcomes = await asyncio.gather(
            *(self.store.put(path, files[path]) for path in paths), return_exceptions=True
        )
        for path, outcome in zip(paths, outcomes, strict=True):
            if not isinstance(outcome, BaseException):
                del files[path]
                self.files_written += 1
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome


def build_archiver(
    settings: Settings,
    archive: ArchiveSettings,
    store: ObjectStore,
    *,
    broker: Broker | None = None,
    heartbeat: Heartbeat | None = None,
) -> ConsumerLoop:
    """The consume loop in archive mode: its own group, every topic the pattern takes,
    files in `store` before each ack. `broker` (tests) must use ARCHIVE_GROUP."""
    loop_settings = archive.loop_settings(settings)
    broker = broker if broker is not None else open_broker(loop_settings)
    broker.pattern = archive.topic_pattern(settings)
    return build_loop(
        loop_settings,
        Router(),
        broker=broker,
        heartbeat=heartbeat,
        sink=ArchiveSink(store, archive),
    )
