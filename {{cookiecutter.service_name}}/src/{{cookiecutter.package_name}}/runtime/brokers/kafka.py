"""Kafka adapter (aiokafka): consumer group, read-ahead, contiguous offset commits, drain
on revoke.

Keys are partitioned with aiokafka's default partitioner, which is the Java client's
murmur2 (toPositive(murmur2(key)) % partitions), so a key lands on the same partition
whichever language produced it.

With KAFKA_CREATE_TOPICS on, missing topics are created with KAFKA_TOPIC_PARTITIONS:
consumed and dead-letter topics at start, the topic of an emitted event before the first
publish to it. With it off, a missing consumed or dead-letter topic stops the start with
one line, and a missing emitted topic holds publishing (not ready) until it exists.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from itertools import groupby, islice
from operator import attrgetter
from typing import Any, Literal
from urllib.parse import urlsplit

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..config import ENV_PREFIX, Settings, load_model
from ..errors import ConfigError
from ..logs import get_logger
from .base import (
    MAX_HEADER_BYTES,
    MAX_KEY_BYTES,
    NO_HEADERS,
    Broker,
    BrokerUnavailable,
    InboundMessage,
    OnRevoked,
    OutboundMessage,
    PublishLimits,
    Unpublishable,
    fill_batch,
    text_headers,
)
from .kafka_batches import Partitioner, RecordBatch, record_batches
from .tls import tls_context

log = get_logger(component="kafka")
# Errors about one record that no retry can cure (the client's or a broker's size limit).
REFUSED = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    InvalidTopicError,
)
# A record's framing besides its key, value and headers (batch header, varints), with room.
RECORD_OVERHEAD_BYTES = 1024
# Records the producer gathers per partition into one batch (aiokafka's default: 16 KiB),
# at most MAX_MESSAGE_BYTES. With one produce request in flight per broker, this is what
# bounds the rate of emitted events: 16 KiB held about 13 events of 1 KB per partition
# and round trip. A larger record travels alone in its batch.
PRODUCER_BATCH_BYTES = 256 * 1024


class KafkaSettings(BaseSettings):
    """Kafka-only settings; the same prefix as every other variable."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = None
    kafka_create_topics: bool = Field(
        True, description="Create missing topics (consumed at start, emitted at first publish)"
    )
    kafka_topic_partitions: int = Field(3, gt=0, description="Partitions of created topics")
    kafka_replication_factor: int = Field(1, gt=0, description="Replicas of created topics")
    kafka_session_timeout_ms: int = Field(10_000, gt=0, description="Group session timeout")
    kafka_heartbeat_interval_ms: int = Field(3_000, gt=0, description="Group heartbeat interval")
    kafka_group_instance_id: str | None = Field(
        None,
        min_length=1,
        description="Static group membership: a name unique per replica and stable across "
        "its restarts (the pod name); a restarted replica gets its partitions back at once",
    )
    kafka_fetch_max_wait_ms: int = Field(
        100, ge=0, description="Longest a fetch waits at the broker for data (latency when quiet)"
    )

    @model_validator(mode="after")
    def _sasl_needs_credentials(self) -> KafkaSettings:
        if self.kafka_security_protocol.startswith("SASL") and not (
            self.kafka_sasl_username and self.kafka_sasl_password
        ):
            raise ValueError("SASL needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD")
        return self


def bootstrap_servers(url: str) -> list[str]:
    """kafka://host:port,host:port -> ["host:port", ...]"""
    hosts = [host.strip() for host in urlsplit(url).netloc.split(",") if host.strip()]
    return hosts or ["localhost:9092"]


def stream_of(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def inbound_messages(partition: TopicPartition, records: Iterable[Any]) -> list[InboundMessage]:
    """Records fetched from `partition` as deliveries (the loop's, and operator reads')."""
    topic, stream = partition.topic, stream_of(partition.topic, partition.partition)
    return [
        InboundMessage(
            record.value or b"",
            topic,
            stream,
            record.offset,
            record.key.decode("utf-8", "backslashreplace") if record.key else None,
            text_headers(record.headers) if record.headers else NO_HEADERS,
            False,
            partition,
        )
        for record in records
    ]


class _Offsets:
    """Delivered offsets of one partition; commits only the finished contiguous prefix."""

    def __init__(self) -> None:
        self.delivered: list[int] = []
        self.finished: set[int] = set()

    def commit_point(self) -> int | None:
        """Offset to commit (next to read), or None if the oldest delivery is unfinished."""
        finished = len(self.finished)
        if 0 < finished <= len(self.delivered) and self.finished.issuperset(
            islice(self.delivered, finished)
        ):  # the usual case, checked in C: what finished is exactly the oldest deliveries
            point = self.delivered[finished - 1] + 1
            del self.delivered[:finished]
            self.finished.clear()
            return point
        done = 0
        while done < len(self.delivered) and self.delivered[done] in self.finished:
            self.finished.discard(self.delivered[done])
            done += 1
        if done == 0:
            return None
        point = self.delivered[done - 1] + 1
        del self.delivered[:done]
        return point


class KafkaBroker(Broker):
    messaging_system = "kafka"
    exclusive_streams = True
    limits: PublishLimits

    def __init__(self, settings: Settings, kafka: KafkaSettings) -> None:
        self.settings = settings
        self.kafka = kafka
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._offsets: dict[TopicPartition, _Offsets] = defaultdict(_Offsets)
        # Fetched from aiokafka but not yet handed to the loop (from `_ahead_at` on).
        self._ahead: list[InboundMessage] = []
        self._ahead_at = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.limits = PublishLimits(body=settings.max_message_bytes)
        self._ready_topics: set[str] = set()  # known to exist (or created)
        self._on_revoked: OnRevoked | None = None
        self._partitioner = Partitioner()

    def _client_options(self) -> dict[str, Any]:
        kafka = self.kafka
        protocol = kafka.kafka_security_protocol
        options: dict[str, Any] = {
            "bootstrap_servers": bootstrap_servers(self.settings.broker_url),
            "security_protocol": protocol,
            "client_id": self.settings.consumer_group,
        }
        if protocol in ("SSL", "SASL_SSL"):
            options["ssl_context"] = tls_context(self.settings, required=True)
        if protocol.startswith("SASL"):
            options["sasl_mechanism"] = kafka.kafka_sasl_mechanism
            options["sasl_plain_username"] = kafka.kafka_sasl_username
            options["sasl_plain_password"] = kafka.kafka_sasl_password
        return options

    async def start(self, topics: Sequence[str], on_revoked: OnRevoked | None = None) -> None:
        self._on_revoked = on_revoked
        options = self._client_options()
        dead_letter_topics = [self.dead_letter_destination(t) for t in topics]
        # (The archiver's pattern names no topic to create: it takes those that exist.)
        missing = await self._prepare_topics([*topics, *dead_letter_topics])
        if missing:
            raise ConfigError(
                f"Kafka topics missing and KAFKA_CREATE_TOPICS is off: {', '.join(missing)}"
            )
        if self._producer is None:  # start() is retried after a failure: keep what started
            producer = AIOKafkaProducer(
                **options,
                acks="all",
                enable_idempotence=False,
                linger_ms=2,
                max_batch_size=min(PRODUCER_BATCH_BYTES, self.settings.max_message_bytes),
                # MAX_MESSAGE_BYTES of body, plus the key, headers and framing `limits` allow.
                max_request_size=self.settings.max_message_bytes
                + MAX_KEY_BYTES
                + MAX_HEADER_BYTES
                + RECORD_OVERHEAD_BYTES,
            )
            await _unavailable_on_error(producer.start())
            self._producer = producer
        if not topics and self.pattern is None:
            return
        consumer = AIOKafkaConsumer(
            **options,
            group_id=self.settings.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=None,  # getmany takes all it has (see _read_ahead)
            fetch_max_wait_ms=self.kafka.kafka_fetch_max_wait_ms,
            session_timeout_ms=self.kafka.kafka_session_timeout_ms,
            heartbeat_interval_ms=self.kafka.kafka_heartbeat_interval_ms,
            group_instance_id=self.kafka.kafka_group_instance_id,
            # The archiver's pattern takes topics created later: look for them every 30 s.
            metadata_max_age_ms=30_000 if self.pattern is not None else 300_000,
        )
        if self.pattern is not None:
            consumer.subscribe(pattern=self.pattern.pattern, listener=_DrainOnRevoke(self))
        else:
            consumer.subscribe(list(topics), listener=_DrainOnRevoke(self))
        try:
            await _unavailable_on_error(consumer.start())
        except BrokerUnavailable:
            await consumer.stop()
            raise
        self._consumer = consumer

    async def _prepare_topics(self, topics: Iterable[str]) -> list[str]:
        """Create those of `topics` that do not exist (KAFKA_CREATE_TOPICS on); returns
        those still missing (it off). Each topic is looked up once per process."""
        wanted = set(topics) - self._ready_topics
        if not wanted:
            return []
        admin = AIOKafkaAdminClient(**self._client_options())
        await _unavailable_on_error(admin.start())
        try:
            missing = sorted(wanted - set(await _unavailable_on_error(admin.list_topics())))
            if missing and self.kafka.kafka_create_topics:
                # Another replica creating one at the same time is fine: it then exists.
                await _unavailable_on_error(
                    admin.create_topics(
                        [
                            NewTopic(
                                topic,
                                self.kafka.kafka_topic_partitions,
                                self.kafka.kafka_replication_factor,
                            )
                            for topic in missing
                        ]
                    )
                )
                log.info("created topics", topics=missing)
                missing = []
        finally:
            await admin.close()
        self._ready_topics |= wanted.difference(missing)
        return missing

    async def fetch_batch(
        self, max_messages: int, first_wait_s: float, fill_until: float
    ) -> list[InboundMessage]:
        return await fill_batch(self._take, max_messages, first_wait_s, fill_until)

    def dead_letter_destination(self, topic: str) -> str:
        return self.settings.dead_letter_topic_for(topic)

    def span_attributes(self, message: InboundMessage) -> dict[str, Any]:
        partition: TopicPartition = message.handle
        return {
            "messaging.destination.partition.id": str(partition.partition),
            "messaging.kafka.offset": message.position,
        }

    async def _take(self, max_messages: int, max_wait_s: float) -> list[InboundMessage]:
        """Read-ahead first; aiokafka is asked only once it is handed out."""
        if self._ahead_at == len(self._ahead):
            await self._read_ahead(max_wait_s)
        start = self._ahead_at
        batch = self._ahead[start : start + max_messages]
        self._ahead_at = start + len(batch)
        for partition, handed in groupby(batch, key=attrgetter("handle")):
            self._offsets[partition].delivered.extend(message.position for message in handed)
        if batch:
            self._idle.clear()
        return batch

    async def _read_ahead(self, max_wait_s: float) -> None:
        """Take everything aiokafka has fetched. It asks the broker for more only once its
        buffer is empty: emptied now, the next fetch is under way while the loop handles
        these, instead of starting when the loop asks for the next batch."""
        assert self._consumer is not None, "fetch needs start() with topics"
        try:
            records = await self._consumer.getmany(timeout_ms=int(max_wait_s * 1000))
        except KafkaError as error:
            raise BrokerUnavailable(f"kafka fetch: {error!r}") from error
        ahead: list[InboundMessage] = []
        for partition, messages in records.items():
            ahead += inbound_messages(partition, messages)
        self._ahead, self._ahead_at = ahead, 0

    async def publish(self, messages: Sequence[OutboundMessage]) -> Sequence[OutboundMessage]:
        """Every topic keeps what is published to it: nothing is ever unrouted."""
        producer = self._producer
        assert producer is not None, "publish needs start()"
        if refused := self.limits.refused(messages):
            raise Unpublishable(refused)  # nothing sent
        if missing := await self._prepare_topics({message.topic for message in messages}):
            raise BrokerUnavailable(
                f"kafka: topic {missing[0]} does not exist and KAFKA_CREATE_TOPICS is off"
            )
        # `limits` bounds every record, so the client refuses none; its batches go whole.
        sent: list[tuple[RecordBatch, asyncio.Future[Any]]] = []
        try:
            for batch in await record_batches(producer, messages, self._partitioner):
                sending = await producer.send_batch(
                    batch.builder, batch.topic, partition=batch.partition
                )
                sent.append((batch, sending))
            outcomes = await asyncio.gather(*(s for _, s in sent), return_exceptions=True)
        except KafkaError as error:
            for _, sending in sent:  # whatever comes of those already sent: retried whole
                sending.add_done_callback(_consume_outcome)
            raise BrokerUnavailable(f"kafka publish failed: {error!r}") from error
        for (batch, _), outcome in zip(sent, outcomes, strict=True):
            # A broker's (or topic's) size limit. A batch holds at most MAX_MESSAGE_BYTES, and
            # a record larger than a batch travels alone: with MAX_MESSAGE_BYTES no more
            # than the broker takes (as configured), the refusal is about that record only.
            if isinstance(outcome, REFUSED):
                refused.update(dict.fromkeys(batch.indexes, _refusal(outcome)))
            elif isinstance(outcome, KafkaError):
                raise BrokerUnavailable(f"kafka publish failed: {outcome!r}") from outcome
            elif isinstance(outcome, BaseException):
                raise outcome
        if refused:
            raise Unpublishable(refused)
        return ()

    async def ack(self, messages: Sequence[InboundMessage]) -> None:
        assert self._consumer is not None
        for partition, acked in groupby(messages, key=attrgetter("handle")):
            self._offsets[partition].finished.update(message.position for message in acked)
        commits: dict[TopicPartition, int] = {}
        assigned = self._consumer.assignment()
        for partition, offsets in list(self._offsets.items()):
            point = offsets.commit_point()
            if point is not None and partition in assigned:
                commits[partition] = point
        try:
            if commits:
                await self._consumer.commit(commits)
        except (CommitFailedError, IllegalStateError) as error:
            # The group moved on (rebalance): the new owner gets these again; dedupe drops them.
            log.warning("commit refused after a rebalance", error=str(error))
        except KafkaError as error:
            raise BrokerUnavailable(f"kafka commit failed: {error!r}") from error
        finally:
            if not any(offsets.delivered for offsets in self._offsets.values()):
                self._idle.set()

    async def revoke(self, partitions: set[TopicPartition]) -> None:
        """Let in-flight work of revoked partitions finish and commit, then forget them."""
        if not self._idle.is_set():
            log.info("rebalance: draining in-flight work", partitions=len(partitions))
            try:
                await asyncio.wait_for(self._idle.wait(), self.settings.drain_timeout_s)
            except TimeoutError:
                log.warning("rebalance: drain deadline passed; uncommitted work is redelivered")
        for partition in partitions:
            self._offsets.pop(partition, None)
        # Their read-ahead goes too: their next owner starts from the committed offset.
        ahead = self._ahead[self._ahead_at :]
        self._ahead = [message for message in ahead if message.handle not in partitions]
        self._ahead_at = 0
        if self._on_revoked is not None:
            self._on_revoked({stream_of(tp.topic, tp.partition) for tp in partitions})

    async def lag(self) -> dict[str, int]:
        """Per assigned partition: high watermark minus the oldest offset not yet acked."""
        consumer = self._consumer
        if consumer is None:
            return {}
        found: dict[str, int] = {}
        try:
            for partition in consumer.assignment():
                highwater = consumer.highwater(partition)
                if highwater is None:
                    continue  # nothing fetched from it yet
                pending = self._offsets.get(partition)
                ahead = (m.position for m in self._ahead[self._ahead_at :] if m.handle == partition)
                if pending is not None and pending.delivered:
                    oldest = pending.delivered[0]
                elif (first_ahead := next(ahead, None)) is not None:
                    oldest = first_ahead
                else:
                    oldest = await consumer.position(partition)
                found[stream_of(partition.topic, partition.partition)] = max(0, highwater - oldest)
        except KafkaError as error:
            raise BrokerUnavailable(f"kafka: {error!r}") from error
        return found

    async def close(self) -> None:
        if self._consumer is not None:
            with _logged_on_error("consumer"):
                await self._consumer.stop()  # no commit: unacked work is redelivered
            self._consumer = None
        # Leaving the group revokes nothing through the listener: forget what was delivered
        # here, or a restart() (rejoining after being fenced) would wait on it for ever.
        self._offsets.clear()
        self._ahead, self._ahead_at = [], 0
        self._idle.set()
        if self._producer is not None:
            with _logged_on_error("producer"):
                await self._producer.stop()
            self._producer = None


class _DrainOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, broker: KafkaBroker) -> None:
        self.broker = broker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked:
            await self.broker.revoke(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info(
            "partitions assigned", partitions=sorted(f"{p.topic}:{p.partition}" for p in assigned)
        )


@contextlib.contextmanager
def _logged_on_error(what: str) -> Iterator[None]:
    """Closing a client whose broker is gone: nothing is left to do but say so."""
    try:
        yield
    except KafkaError as error:
        log.warning(f"{what} closed with an error", error=repr(error))


async def _unavailable_on_error(step: Any) -> Any:
    try:
        return await step
    except KafkaError as error:
        raise BrokerUnavailable(f"kafka: {error!r}") from error


def _consume_outcome(future: asyncio.Future[Any]) -> None:
    """Takes a future's outcome, so that an exception nobody waits for is not reported."""
    if not future.cancelled():
        future.exception()


def _refusal(error: KafkaError) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


def open_broker(settings: Settings) -> Broker:
    return KafkaBroker(settings, load_model(KafkaSettings))
