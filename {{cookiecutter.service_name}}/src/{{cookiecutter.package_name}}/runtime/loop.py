"""The consume loop: fetch a batch, react, make the reaction durable, then ack (group commit).

Per batch: decode -> dedupe -> load per-key state for stateful handlers -> handle (keys
concurrently, each key in order, transient errors retried with backoff + jitter) ->
publish emitted events and dead letters and wait for the bus to confirm -> record handled
ids, progress and changed key state in the state store -> ack. A crash at any point
before the ack redelivers the batch; dedupe and deterministic emitted ids make the re-run
harmless.

Handled batches are made durable in groups (group commit): one publish, one store write
per stream and one ack for every batch handled since the last group began. A group is
written once COMMIT_INTERVAL_MS passed since the one before it began, or at once when it
holds MAX_GROUP_MESSAGES messages (a whole batch if BATCH_SIZE is larger; fewer if the
bus allows fewer unacked deliveries, as RabbitMQ's prefetch does), so a stream sees at
most one store write per interval whatever the message rate. Meanwhile the next batches
are fetched and handled, so the loop does not sit idle on the store and the bus. Groups
are written one after another, so acks stay in batch order; a batch's ids and key state
are known to the next batch before they are durable; if they never become durable (a
crash, a newer owner), the unacked batches are redelivered and what was known is dropped
with the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import groupby
from operator import attrgetter
from typing import Any, TypeVar

import structlog
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from . import telemetry
from .brokers.base import (
    DLQ_TRUNCATED,
    Broker,
    BrokerUnavailable,
    DeadLetterRecord,
    InboundMessage,
    OutboundMessage,
    PublishLimits,
    Unpublishable,
    dead_letter_message,
    event_message,
)
from .config import Settings
from .dedupe import DedupeWindow, digest
from .envelope import Envelope, EnvelopeCodec, derive_event_id, event_type_of, now
from .errors import DeadLetter, UndecodableEvent
from .health import Heartbeat
from .logs import get_logger
from .router import Context, Emitted, HandlerSpec, Router
from .spans import ConsumerSpans
from .state.base import (
    Checkpoint,
    Conflict,
    Fence,
    Fenced,
    KeyState,
    StateStore,
    StateUnavailable,
)

MAX_STATE_BYTES = 64 * 1024  # per key: state travels in every checkpoint that changes it
STATE_CACHE_KEYS = 10_000  # per exclusive stream; older keys are read again when needed
LAG_INTERVAL_S = 5.0  # how often the bus is asked for consumer lag
# Messages a group may gather before it is written without waiting out the interval (a
# whole batch if BATCH_SIZE is larger): this bounds what is held in memory, and what runs
# again after a crash, while the store is slow. 8 batches of the default size.
MAX_GROUP_MESSAGES = 4_000
T = TypeVar("T")


@dataclass
class LoopStats:
    received: int = 0
    handled: int = 0
    duplicates: int = 0
    retries: int = 0
    emitted: int = 0
    unrouted: int = 0  # emitted events no consumer was bound for (parked, see the broker)
    acked: int = 0
    batches: int = 0
    shared_lookups: int = 0
    fenced: int = 0  # times unacked work was dropped to rejoin (fenced, or a conflict)
    conflicts: int = 0  # of those, key-state conflicts on a shared stream
    dead_lettered: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class _Work:
    message: InboundMessage
    envelope: Envelope
    spec: HandlerSpec


# What handling one event came to: the events it emitted, or a dead letter.
_Outcome = Sequence[Emitted] | DeadLetterRecord


@dataclass(slots=True)
class _KeySlot:
    """One key's handler state while a batch handles that key's events in order."""

    stored: KeyState
    value: bytes | None = None
    applied: list[str] = field(default_factory=list)
    changed: bool = False

    def __post_init__(self) -> None:
        self.value = self.stored.value

    def begin(self) -> dict[str, Any]:
        """A fresh copy for one attempt: a failed attempt leaves no trace."""
        return dict(json.loads(self.value)) if self.value is not None else {}

    def finish(self, event_id: str, state: dict[str, Any]) -> None:
        """Keep what a successful handler left in ctx.state; DeadLetter if unusable."""
        try:
            encoded = json.dumps(state, separators=(",", ":"), sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise DeadLetter(
                "handler-failed", f"ctx.state must hold JSON values: {error}"
            ) from None
        if len(encoded) > MAX_STATE_BYTES:
            raise DeadLetter(
                "state-too-large",
                f"ctx.state is {len(encoded)} bytes encoded; the limit is {MAX_STATE_BYTES}",
            )
        value = None if encoded == "{}" else encoded.encode()
        self.applied.append(event_id)
        if value != self.value:
            self.value, self.changed = value, True

    def to_store(self) -> KeyState:
        return KeyState(self.value, tuple(self.applied), self.stored.version)


@dataclass(slots=True)
class _Batch:
    """What one batch produced, gathered before anything is made durable."""

    outbound: list[OutboundMessage] = field(default_factory=list)
    dead: list[DeadLetterRecord] = field(default_factory=list)
    unrouted: Sequence[OutboundMessage] = ()  # emitted events the bus parked as unroutable
    processed: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # ids
    digests: dict[str, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    recorded_at: float = 0.0  # when the batch's ids count as handled
    fences: dict[str, Fence | None] = field(default_factory=dict)  # per stream, when handled
    handled: int = 0
    emitted: int = 0
    duplicates: int = 0
    states: dict[str, dict[str, KeyState]] = field(default_factory=lambda: defaultdict(dict))
    progress: dict[str, int] = field(default_factory=dict)

    def joins(self, later: _Batch) -> bool:
        """Whether `later` may be written together with this batch: a stream handled under
        another fence (taken over in between) must be written apart, in order."""
        fences = self.fences
        return all(fences.get(stream, fence) == fence for stream, fence in later.fences.items())

    def absorb(self, later: _Batch) -> None:
        """Add what `later` (handled after this batch) must make durable. Digests are not
        kept: a batch's digests are remembered by the window before it joins a group."""
        self.outbound += later.outbound
        self.dead += later.dead
        for stream, ids in later.processed.items():
            self.processed[stream] += ids
        self.recorded_at = max(self.recorded_at, later.recorded_at)
        self.fences.update(later.fences)
        self.handled += later.handled
        self.emitted += later.emitted
        self.duplicates += later.duplicates
        for stream, states in later.states.items():
            merged = self.states[stream]
            for key, new in states.items():
                old = merged.get(key)
                merged[key] = (
                    new
                    if old is None
                    else KeyState(new.value, old.applied + new.applied, old.version)
                )
        for stream, progress in later.progress.items():
            self.progress[stream] = max(progress, self.progress.get(stream, progress))


@dataclass(slots=True)
class _Group:
    """Handled batches made durable together; open to more batches until it is written."""

    messages: list[InboundMessage]
    result: _Batch
    # Set when the group is to be written without waiting out the interval.
    due: asyncio.Event = field(default_factory=asyncio.Event)
    # The group written before this one: it must be durable first.
    after: asyncio.Future[None] | None = None


class ConsumerLoop:
    def __init__(
        self,
        *,
        router: Router,
        broker: Broker,
        state: StateStore,
        codec: EnvelopeCodec,
        settings: Settings,
        heartbeat: Heartbeat | None = None,
        clock: Callable[[], float] = time.time,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self.router = router
        self.broker = broker
        self.state = state
        self.codec = codec
        self.settings = settings
        self.heartbeat = heartbeat
        self.clock = clock
        self.stats = LoopStats()
        self.log = get_logger(service=settings.consumer_group)
        self.tracer = telemetry.tracer(tracer_provider)
        self._consumer_spans = ConsumerSpans(self.tracer)
        self._tracing = telemetry.tracing_enabled(tracer_provider)
        self._trace_fields = telemetry.propagation_fields()
        self.metrics = telemetry.LoopMetrics(meter_provider)
        self._metering = telemetry.metrics_enabled(meter_provider)
        self._lag_checked_at = 0.0
        self._windows: dict[str, DedupeWindow] = {}
        self._fences: dict[str, Fence | None] = {}
        self._cursors: dict[str, int] = {}
        self._progress: dict[str, int] = {}  # exclusive streams: next position not yet durable
        self._state_cache: dict[str, OrderedDict[str, KeyState]] = {}  # exclusive streams
        # The last group's durable step (which waits for the group before it), and that
        # group while it still takes batches.
        self._durable: asyncio.Future[None] | None = None
        self._open: _Group | None = None
        self._last_write_at = -float("inf")  # event-loop time the last group began writing
        # A group is written at once when this full; the bus must still be able to deliver
        # the next batch while it is written.
        self._group_full_at = max(settings.batch_size, MAX_GROUP_MESSAGES)
        if broker.max_unacked is not None:
            room = broker.max_unacked - settings.batch_size
            self._group_full_at = max(1, min(self._group_full_at, room))
        # Set once the broker is connected and subscribed (tests and demos wait for it).
        self.started = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> LoopStats:
        """Consume until `stop` is set, then drain in-flight work within the deadline."""
        await self._until_done("open store", self.state.open)
        topics = [self.settings.topic_for(name) for name in self.router.event_types()]
        await self._until_done("connect", partial(self.broker.start, topics, self._forget_streams))
        self.log.info("started", topics=topics)
        self.started.set()
        try:
            while not stop.is_set():
                self._beat(ready=True)
                await self._check_lag()
                batch = await self._fetch_unless_stopped(stop)
                try:
                    if batch:
                        await self._process_or_drain(batch, stop)
                    elif self._durable is not None and self._durable.done():
                        await self._settle()  # a quiet bus: learn how the last group ended
                except (Fenced, Conflict) as refused:
                    await self._rejoin(refused, topics)
            await self._drain(self._settle())
        finally:
            await self._abandon_durable()  # a crash or cancellation: no ack behind our back
            await self.broker.close()
            await self.state.close()
            if self.heartbeat is not None:
                self.heartbeat.clear()
            self.log.info("stopped", **self._summary())
        return self.stats

    async def _check_lag(self) -> None:
        """Refresh the consumer-lag gauge every LAG_INTERVAL_S; a bus that does not answer
        only leaves the last figures in place. A metric never stops the loop: an adapter's
        unexpected error is logged, not raised."""
        now_s = time.monotonic()
        if now_s - self._lag_checked_at < LAG_INTERVAL_S:
            return
        self._lag_checked_at = now_s
        try:
            self.metrics.lag = await self.broker.lag()
        except BrokerUnavailable as error:
            self.log.debug("consumer lag unavailable", error=str(error))
        except Exception as error:
            self.log.warning("consumer lag check failed", error=f"{type(error).__name__}: {error}")

    async def _fetch_unless_stopped(self, stop: asyncio.Event) -> list[InboundMessage]:
        fetching = asyncio.ensure_future(self._fill_batch())
        if not await _finished_before(fetching, stop):
            fetching.cancel()  # nothing was delivered yet; close() returns anything that was
            await asyncio.gather(fetching, return_exceptions=True)
            return []
        return fetching.result()

    async def _fill_batch(self) -> list[InboundMessage]:
        """Up to BATCH_SIZE messages: once one arrived, keep filling until the next group
        may be written (COMMIT_INTERVAL_MS after the last one began). Waiting longer would
        only delay the ack; handling sooner would only make smaller batches."""
        settings = self.settings
        return await self._until_done(
            "fetch",
            lambda: self.broker.fetch_batch(
                settings.batch_size, settings.batch_timeout_ms / 1000, self._next_write_at()
            ),
        )

    def _next_write_at(self) -> float:
        """Event-loop time from which the next group may be written, unless it is due."""
        return self._last_write_at + self.settings.commit_interval_ms / 1000

    async def _process_or_drain(self, batch: list[InboundMessage], stop: asyncio.Event) -> None:
        processing = asyncio.ensure_future(self._react_then_make_durable(batch))
        if await _finished_before(processing, stop):
            processing.result()
        else:
            self.log.info(
                "draining", in_flight=len(batch), deadline_s=self.settings.drain_timeout_s
            )
            await self._drain(processing)

    async def _drain(self, work: Awaitable[None]) -> None:
        """Stopping: let `work` and the batch being made durable finish within the deadline."""
        try:
            async with asyncio.timeout(self.settings.drain_timeout_s):
                await work
                await self._settle()
        except TimeoutError:
            self.log.warning("drain deadline passed; unacked messages will be redelivered")
        except Fenced as fenced:
            self.log.error("fenced while stopping; not acking", stream=fenced.stream)
        except Conflict as conflict:
            self.log.warning("key state conflict while stopping; not acking", why=str(conflict))

    async def _react_then_make_durable(self, batch: Sequence[InboundMessage]) -> None:
        """React to `batch`, then hand it to the group being gathered, or start a group."""
        result = await self._react(batch)
        if self._durable is not None and self._durable.done():
            await self._settle()  # learn how the last group ended (fenced: `batch` is not kept)
        group = self._open
        if group is not None and group.result.joins(result):
            group.messages += batch
            group.result.absorb(result)
        else:
            if group is not None:
                group.due.set()  # closed to `batch`: nothing is gained by waiting
            group = _Group(list(batch), result, after=self._durable)
            self._open = group
            self._durable = asyncio.ensure_future(self._make_durable(group))
        if len(group.messages) >= self._group_full_at:
            group.due.set()
            if group.after is not None:  # hold no more than one full group in memory
                await group.after

    async def _settle(self) -> None:
        """Make every handled batch durable now and wait until it is acked; raises what
        that raised."""
        durable, self._durable = self._durable, None
        if self._open is not None:
            self._open.due.set()
            self._open = None
        if durable is not None:
            await durable

    async def _abandon_durable(self) -> None:
        """Drop the groups not yet acked (they will be redelivered)."""
        durable, self._durable, self._open = self._durable, None, None
        if durable is not None:
            durable.cancel()
            await asyncio.gather(durable, return_exceptions=True)

    async def _react(self, batch: Sequence[InboundMessage]) -> _Batch:
        """Everything before durability: decode, dedupe, handle, gather what to write."""
        self.stats.batches += 1
        self.metrics.batch_size.record(len(batch))
        self.stats.received += len(batch)
        streams = {message.stream for message in batch}
        await self._restore(streams)
        await self._refresh({message.stream for message in batch if message.redelivered})
        # Taken now: a rebalance may forget a stream while its batch is being made durable.
        result = _Batch(fences={stream: self._fences[stream] for stream in streams})
        work = self._sort(batch, result)
        # Let the last batch's durable step take its next round trip (store, then bus)
        # before handling keeps the event loop busy: its ack then waits less (~4 %).
        await asyncio.sleep(0)
        slots = await self._load_key_states(work)
        await self._handle_all(work, slots, result)
        for (stream, key), slot in slots.items():
            if slot.changed:
                result.states[stream][key] = slot.to_store()
        result.outbound.extend(
            dead_letter_message(
                record,
                self.broker.dead_letter_destination(record.message.topic),
                self.settings.consumer_group,
            )
            for record in result.dead
        )
        self._known_before_durable(result)
        return result

    def _known_before_durable(self, result: _Batch) -> None:
        """What the next batch must see while this one is still being made durable."""
        now_s = self.clock()
        for stream, digests in result.digests.items():
            window = self._windows.get(stream)
            if window is not None:  # else given up in a rebalance while being handled
                window.remember(digests, result.recorded_at, now_s)
        for stream, states in result.states.items():
            self._remember_states(stream, states)

    async def _make_durable(self, group: _Group) -> None:
        """Once the group before is durable and the interval passed (or the group is due):
        publish, checkpoint, then ack; counts once acked."""
        if group.after is not None:
            await group.after
            group.after = None
        clock = asyncio.get_running_loop().time
        wait = self._next_write_at() - clock()
        if wait > 0 and not group.due.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await group.due.wait()
        if self._open is group:  # closed: later batches start the next group
            self._open = None
        self._last_write_at = clock()
        batch, result = group.messages, group.result
        if result.outbound:
            await self._publish(result)
        if result.processed or result.states or result.progress:
            started = time.perf_counter()
            await self._until_done("checkpoint", lambda: self._commit(result))
            self.metrics.checkpoint_duration.record(time.perf_counter() - started)
        await self._until_done("ack", lambda: self.broker.ack(batch))
        self._after_ack(len(batch), result)

    async def _publish(self, result: _Batch) -> None:
        """Publish the group's events and dead letters; wait while the bus is unavailable.
        A message the bus can never take is not retried: it is replaced (see
        `_replace_refused`) and the rest published again, so it cannot stall the loop."""
        while True:
            try:
                publish = partial(self.broker.publish, result.outbound)
                result.unrouted = await self._until_done("publish", publish)
                return
            except Unpublishable as refused:
                result.outbound = self._replace_refused(result, refused.refused)

    def _replace_refused(self, result: _Batch, refused: Mapping[int, str]) -> list[OutboundMessage]:
        """What to publish instead of the messages the bus refused for good. A dead letter
        is cut to fit (smaller again if the bus still refuses it). An emitted event
        dead-letters the event it was emitted for, whose other emitted events are dropped
        (the handler's other effects, its key state included, stand)."""
        outbound = result.outbound
        limits = self.broker.limits or PublishLimits(self.settings.max_message_bytes)
        cut: dict[int, OutboundMessage | None] = {}
        sources: dict[int, InboundMessage] = {}  # by id(): events whose emits are refused
        parked = []
        for index, why in refused.items():
            message, source = outbound[index], outbound[index].origin
            if message.dead_letter:
                cut[index] = _cut_to_fit(message, limits)
                self._log_cut(message, cut[index], why)
                continue
            assert source is not None, "the loop's events carry the event they answer"
            if id(source) not in sources:
                sources[id(source)] = source
                record = DeadLetterRecord(
                    source, "emit-unpublishable", f"event for {message.topic}: {why}"
                )
                result.dead.append(record)
                result.handled -= 1
                topic = self.broker.dead_letter_destination(source.topic)
                parked.append(dead_letter_message(record, topic, self.settings.consumer_group))
        kept = []
        for index, message in enumerate(outbound):
            if index in cut:
                if (replacement := cut[index]) is not None:
                    kept.append(replacement)
            elif message.dead_letter or id(message.origin) not in sources:
                kept.append(message)
            else:
                result.emitted -= 1  # emitted for an event now dead-lettered
        return kept + parked

    def _log_cut(self, message: OutboundMessage, cut: OutboundMessage | None, why: str) -> None:
        origin = message.origin
        where = origin and f"{origin.topic}|{origin.stream}|{origin.position}"
        if cut is None:
            self.log.error(
                "dead letter dropped: the bus refuses even its headers", why=why, origin=where
            )
        else:
            self.log.warning(
                "dead letter cut to fit the bus", why=why, origin=where, size=len(message.body)
            )

    def _after_ack(self, acked: int, result: _Batch) -> None:
        """The batch is durable and acked: count it, report what was parked."""
        self.stats.acked += acked
        self.stats.handled += result.handled
        self.stats.emitted += result.emitted
        self.stats.duplicates += result.duplicates
        self.metrics.handled.add(result.handled)
        self.metrics.emitted.add(result.emitted)
        self.metrics.duplicates.add(result.duplicates)
        for stream, progress in result.progress.items():
            if stream in self._progress:  # still ours (a rebalance may have taken it)
                self._progress[stream] = progress
        if result.unrouted:
            self._report_unrouted(result.unrouted)
        for record in result.dead:
            self.stats.dead_lettered[record.reason] += 1
            self.metrics.dead_lettered.add(1, {"reason": record.reason})
            self.log.warning(
                "dead-lettered",
                reason=record.reason,
                error=record.error,
                stream=record.message.stream,
                position=record.message.position,
            )

    def _report_unrouted(self, unrouted: Sequence[OutboundMessage]) -> None:
        """Emitted events no consumer is bound for: counted, logged once per group."""
        self.stats.unrouted += len(unrouted)
        self.metrics.unrouted.add(len(unrouted))
        self.log.warning(
            "emitted events no consumer is bound for; parked",
            parked_in=self.broker.unrouted_destination,
            topics=dict(Counter(message.topic for message in unrouted)),
        )

    def _sort(
        self, batch: Sequence[InboundMessage], result: _Batch
    ) -> dict[tuple[str, str], list[_Work]]:
        """Decode and dedupe; group what must be handled by (stream, key), keeping order.

        Runs once per message: stream-wide lookups are made once per run of messages of
        one stream (a partition's messages come together)."""
        work: dict[tuple[str, str], list[_Work]] = defaultdict(list)
        result.recorded_at = self.clock()
        max_bytes, decode, handler_of = (
            self.settings.max_message_bytes,
            self.codec.decode,
            self.router.get,
        )
        seen_in_batch: dict[str, set[bytes]] = defaultdict(set)
        for stream, run in groupby(batch, key=attrgetter("stream")):
            messages = self._not_checkpointed(stream, run, result)
            known, seen = self._windows[stream].has, seen_in_batch[stream]
            processed, digests = result.processed[stream], result.digests[stream]
            for message in messages:
                body = message.body
                if len(body) > max_bytes:
                    size = f"{len(body)} bytes > {max_bytes}"
                    result.dead.append(DeadLetterRecord(message, "oversized", size))
                    continue
                try:
                    envelope = decode(body)
                except UndecodableEvent as error:
                    result.dead.append(DeadLetterRecord(message, error.reason, error.detail))
                    continue
                event_digest = digest(envelope.id)
                if known(event_digest) or event_digest in seen:
                    result.duplicates += 1
                    continue
                seen.add(event_digest)
                processed.append(envelope.id)
                digests.append(event_digest)
                spec = handler_of(envelope.type)
                if spec is None or envelope.payload is None:
                    result.dead.append(DeadLetterRecord(message, "unknown-type", envelope.type))
                    continue
                key = envelope.subject or message.key or envelope.id
                work[stream, key].append(_Work(message, envelope, spec))
        return work

    def _not_checkpointed(
        self, stream: str, messages: Iterable[InboundMessage], result: _Batch
    ) -> Iterable[InboundMessage]:
        """An exclusive stream's messages below its checkpointed progress were handled
        before a crash cut their ack short: counted as duplicates, not decoded. Advances
        the batch's progress past every message."""
        done = self._progress.get(stream)
        if done is None:  # a shared stream: no progress, ids alone tell
            return messages
        messages = list(messages)
        positions = [message.position for message in messages]
        after = max(positions) + 1
        if after > result.progress.get(stream, done):
            result.progress[stream] = after
        if min(positions) >= done:  # the usual case: nothing was handled before
            return messages
        fresh = [message for message in messages if message.position >= done]
        result.duplicates += len(messages) - len(fresh)
        return fresh

    async def _load_key_states(
        self, work: dict[tuple[str, str], list[_Work]]
    ) -> dict[tuple[str, str], _KeySlot]:
        """State of every key a stateful handler will see: one read per stream, and none
        for keys an exclusive stream's owner already holds."""
        if not self.router.has_stateful():
            return {}
        found: dict[str, dict[str, KeyState]] = defaultdict(dict)
        missing: dict[str, list[str]] = defaultdict(list)
        no_cache: Mapping[str, KeyState] = {}  # shared streams: read every batch
        for (stream, key), items in work.items():
            if any(item.spec.stateful for item in items):
                cached = self._state_cache.get(stream, no_cache).get(key)
                if cached is not None:
                    found[stream][key] = cached
                else:
                    missing[stream].append(key)
        if missing:
            await self._settle()  # the store holds the batches before this one first
            streams = list(missing)
            loaded = await asyncio.gather(
                *(
                    self._until_done("state read", partial(self.state.load_states, stream, keys))
                    for stream, keys in missing.items()
                )
            )
            for stream, states in zip(streams, loaded, strict=True):
                found[stream].update(states)
        return {
            (stream, key): _KeySlot(state)
            for stream, states in found.items()
            for key, state in states.items()
        }

    def _remember_states(self, stream: str, states: dict[str, KeyState]) -> None:
        cache = self._state_cache.get(stream)
        if cache is None:
            return  # shared stream: other replicas write it too, so it is read every batch
        for key, state in states.items():
            cache[key] = state
            cache.move_to_end(key)
        while len(cache) > STATE_CACHE_KEYS:
            cache.popitem(last=False)

    async def _handle_all(
        self,
        work: dict[tuple[str, str], list[_Work]],
        slots: dict[tuple[str, str], _KeySlot],
        result: _Batch,
    ) -> None:
        """Each key's events in order, keys concurrently: up to MAX_CONCURRENCY workers
        take whole keys from one shared list (no task per key or per event). The extra
        workers start only once the first one yields to the event loop (a handler awaited
        I/O): handlers that never wait cost no tasks at all. An event its key's stored
        state already applied (a crash cut its checkpoint short after the state was
        written) is not handled again."""
        groups = list(work.items())
        taken = 0
        handle = self._handle_traced if self._tracing else self._handle_in_span

        async def worker() -> None:
            nonlocal taken
            while taken < len(groups):  # shared: each key is taken by exactly one worker
                group, items = groups[taken]
                taken += 1
                slot = slots.get(group)
                for item in items:
                    if slot is not None and item.envelope.id in slot.stored.applied:
                        result.duplicates += 1  # its key's stored state has it already
                        continue
                    outcome = await handle(item, slot)
                    if isinstance(outcome, DeadLetterRecord):
                        result.dead.append(outcome)
                        continue
                    result.handled += 1
                    if outcome:
                        self._collect_emitted(item, outcome, result)

        async def more_workers() -> None:
            extra = min(self.settings.max_concurrency - 1, len(groups) - taken)
            if extra > 0:
                await asyncio.gather(*(worker() for _ in range(extra)))

        await asyncio.gather(worker(), more_workers())

    async def _handle_traced(self, item: _Work, slot: _KeySlot | None) -> _Outcome:
        """The span is started and made current by hand: the same as
        `start_as_current_span`, at a fraction of its cost."""
        envelope, message = item.envelope, item.message
        parent = telemetry.extract(message.headers, self._trace_fields)
        span = self._consumer_spans.start(message.topic, parent)
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        recording = span.is_recording()  # False when not sampled
        try:
            if recording:
                span.set_attributes(self._span_attributes(message, envelope))
            outcome = await self._handle_in_span(item, slot, span)
            if isinstance(outcome, DeadLetterRecord):
                span.set_status(Status(StatusCode.ERROR, outcome.reason))
            elif recording:
                self._trace_emits(envelope, outcome)
            else:
                for event in outcome:  # pass the (unsampled) trace on, without more spans
                    telemetry.inject(event.headers)
            return outcome
        except BaseException as error:
            if recording:
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
            raise
        finally:
            otel_context.detach(token)
            span.end()

    async def _handle_in_span(
        self, item: _Work, slot: _KeySlot | None, span: trace.Span = trace.INVALID_SPAN
    ) -> _Outcome:
        """Handle one event (in `span`, or in none when there is no tracing SDK). The
        handler's first attempt runs directly; only a failure pays for the retry machinery
        (tenacity), which then replays that failure as its attempt 1."""
        message = item.message
        try:
            context, state, call = self._attempt(item, span, slot, 1)
            await call
        except DeadLetter as error:
            return DeadLetterRecord(message, error.reason, error.detail)
        except Exception as first_error:
            try:
                context, state = await self._retry(item, span, slot, first_error)
            except DeadLetter as error:
                return DeadLetterRecord(message, error.reason, error.detail)
            except Exception as error:
                span.record_exception(error)
                attempts = self.settings.retry_attempts
                detail = f"{type(error).__name__}: {error} (after {attempts} attempts)"
                return DeadLetterRecord(message, "handler-failed", detail)
        emitted = context.emitted
        try:
            if emitted:  # what emitted events carry on (correlation) is first read here
                item.envelope.extensions  # noqa: B018
            if slot is not None and state is not None:
                slot.finish(item.envelope.id, state)
        except DeadLetter as error:  # InvalidEnvelope, or an unusable ctx.state
            return DeadLetterRecord(message, error.reason, error.detail)
        if span is trace.INVALID_SPAN:  # no tracing: pass the incoming trace context on as is
            for event in emitted:
                telemetry.pass_on(message.headers, event.headers, self._trace_fields)
        return emitted

    def _attempt(
        self, item: _Work, span: trace.Span, slot: _KeySlot | None, number: int
    ) -> tuple[Context, dict[str, Any] | None, Awaitable[None]]:
        """One run of the handler, for the caller to await (one coroutine less per event);
        a stateful handler gets a fresh copy of its key's state."""
        state = slot.begin() if slot is not None and item.spec.stateful else None
        log = partial(self._event_log, item.envelope, item.message, span, number)
        context = Context(item.envelope, number, log, span, state)
        call = item.spec.handler(item.envelope.payload, context)
        if self._metering:  # timings are only worth taking when they are exported
            call = self._timed(call, item.envelope.type)
        return context, state, call

    async def _timed(self, call: Awaitable[None], event_type: str) -> None:
        started = time.perf_counter()
        try:
            await call
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.handler_duration.record(elapsed, {"event.type": event_type})

    async def _retry(
        self, item: _Work, span: trace.Span, slot: _KeySlot | None, first_error: Exception
    ) -> tuple[Context, dict[str, Any] | None]:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.settings.retry_attempts),
            wait=wait_random_exponential(
                multiplier=self.settings.retry_initial_backoff_ms / 1000,
                max=self.settings.retry_max_backoff_ms / 1000,
            ),
            retry=retry_if_exception(_is_transient),
            before_sleep=lambda state: self._on_retry(state, item, span),
            reraise=True,
        )
        replay: Exception | None = first_error
        async for attempt in retrying:
            with attempt:
                if replay is not None:  # attempt 1 already ran: its failure, once more
                    error, replay = replay, None
                    raise error
                number = attempt.retry_state.attempt_number
                context, state, call = self._attempt(item, span, slot, number)
                await call
                return context, state
        raise AssertionError("unreachable: tenacity returns or re-raises")

    def _event_log(
        self, envelope: Envelope, message: InboundMessage, span: trace.Span, attempt: int
    ) -> structlog.typing.FilteringBoundLogger:
        """A logger bound to one event; built only when a handler or a retry logs."""
        log = self.log.bind(
            event_id=envelope.id,
            event_type=envelope.type,
            event_source=envelope.source,
            subject=envelope.subject,
            stream=message.stream,
            position=message.position,
            attempt=attempt,
        )
        span_context = span.get_span_context()
        if span_context.is_valid:
            log = log.bind(
                trace_id=format(span_context.trace_id, "032x"),
                span_id=format(span_context.span_id, "016x"),
            )
        return log

    def _span_attributes(self, message: InboundMessage, envelope: Envelope) -> dict[str, Any]:
        """OpenTelemetry messaging and CloudEvents semantic conventions."""
        attributes: dict[str, Any] = {
            "messaging.system": self.broker.messaging_system,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": message.topic,
            "messaging.consumer.group.name": self.settings.consumer_group,
            "messaging.message.id": envelope.id,
            "cloudevents.event_id": envelope.id,
            "cloudevents.event_source": envelope.source,
            "cloudevents.event_type": envelope.type,
        }
        if envelope.subject:
            attributes["cloudevents.event_subject"] = envelope.subject
        attributes.update(self.broker.span_attributes(message))
        return attributes

    def _trace_emits(self, parent: Envelope, emitted: Sequence[Emitted]) -> None:
        """A producer span per emitted event, child of the consumer span; its context
        travels in the event's headers so the next service continues the trace."""
        for event in emitted:
            topic = self.settings.topic_for(event_type_of(event.message))
            with self.tracer.start_as_current_span(
                f"send {topic}",
                kind=SpanKind.PRODUCER,
                attributes={
                    "messaging.system": self.broker.messaging_system,
                    "messaging.operation.type": "send",
                    "messaging.operation.name": "send",
                    "messaging.destination.name": topic,
                    "messaging.message.id": derive_event_id(parent.id, event.position),
                },
            ):
                telemetry.inject(event.headers)

    def _on_retry(self, state: RetryCallState, item: _Work, span: trace.Span) -> None:
        self.stats.retries += 1
        self.metrics.retries.add(1)
        error = state.outcome.exception() if state.outcome is not None else None
        log = self._event_log(item.envelope, item.message, span, state.attempt_number)
        log.warning(
            "retrying",
            attempt=state.attempt_number,
            error=f"{type(error).__name__}: {error}",
            delay_s=round(state.upcoming_sleep, 3),
        )

    def _collect_emitted(self, item: _Work, emitted: Sequence[Emitted], result: _Batch) -> None:
        result.emitted += len(emitted)
        result.outbound.extend(
            self._to_outbound(item.envelope, event, item.message) for event in emitted
        )

    def _to_outbound(
        self, parent: Envelope, emitted: Emitted, origin: InboundMessage
    ) -> OutboundMessage:
        event_type = event_type_of(emitted.message)
        envelope = Envelope(
            id=derive_event_id(parent.id, emitted.position),
            type=event_type,
            source=self.settings.event_source,
            payload=emitted.message,
            subject=emitted.key,
            time=now(),
            extensions={
                "causationid": parent.id,
                "correlationid": parent.extensions.get("correlationid", parent.id),
            },
        )
        topic = self.settings.topic_for(event_type)
        return event_message(self.codec, envelope, topic, emitted.headers, origin)

    async def _restore(self, streams: set[str]) -> None:
        """First sight of a stream: fence earlier owners, load its dedupe records."""
        for stream in sorted(streams - self._windows.keys()):
            started = time.perf_counter()
            fence: Fence | None = None
            if self.broker.exclusive_streams:
                fence = await self._until_done("take over", partial(self.state.take_over, stream))
            loaded = await self._until_done("restore", partial(self.state.load, stream))
            window = DedupeWindow(self.settings.dedupe_max_ids, self.settings.dedupe_ttl_s)
            window.add(loaded.records, self.clock())
            self._windows[stream], self._fences[stream] = window, fence
            self._cursors[stream] = loaded.cursor
            if fence is not None:
                self._state_cache[stream] = OrderedDict()
                self._progress[stream] = loaded.progress or 0
            self.log.info(
                "restored",
                stream=stream,
                ids=len(window),
                progress=loaded.progress,
                seconds=round(time.perf_counter() - started, 4),
            )

    async def _refresh(self, streams: set[str]) -> None:
        """Redeliveries on a shared stream: learn what other replicas recorded since."""
        for stream in sorted(streams):
            if self._fences.get(stream) is not None:
                continue  # an exclusive stream: nobody else writes it
            after = self._cursors[stream]
            loaded = await self._until_done("lookup", partial(self.state.load, stream, after))
            self._windows[stream].add(loaded.records, self.clock())
            self._cursors[stream] = loaded.cursor
            self.stats.shared_lookups += 1

    def _forget_streams(self, streams: set[str]) -> None:
        """Streams given up in a rebalance: their next owner restores them from the store."""
        for stream in streams:
            self._windows.pop(stream, None)
            self._fences.pop(stream, None)
            self._cursors.pop(stream, None)
            self._progress.pop(stream, None)
            self._state_cache.pop(stream, None)

    async def _rejoin(self, refused: Fenced | Conflict, topics: list[str]) -> None:
        """Drop everything unacked and join again: a newer owner took a stream over
        (Fenced), or another replica changed a key's state this one read (Conflict: the
        batches run again on the newer state)."""
        if isinstance(refused, Fenced):
            self.log.error("fenced; rejoining without acking", stream=refused.stream)
        else:
            self.stats.conflicts += 1
            self.log.warning(
                "key state changed by another replica; rejoining to run again",
                stream=refused.stream,
                key=refused.key,
            )
        self.stats.fenced += 1
        await self._abandon_durable()
        await self.broker.close()
        self._forget_streams(set(self._windows))
        await self._until_done("connect", partial(self.broker.start, topics, self._forget_streams))

    async def _commit(self, result: _Batch) -> None:
        """One store write per stream: ids, progress and changed key state together."""
        streams = result.processed.keys() | result.states.keys() | result.progress.keys()
        outcomes = await asyncio.gather(
            *(
                self.state.commit(
                    Checkpoint(
                        stream,
                        result.processed.get(stream, ()),
                        result.recorded_at,
                        result.fences[stream],
                        result.progress.get(stream),
                        result.states.get(stream, {}),
                    )
                )
                for stream in streams
            ),
            return_exceptions=True,
        )
        # Raised once every stream's write has ended: a retry never races a write in flight.
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _until_done(self, what: str, step: Callable[[], Awaitable[T]]) -> T:
        """Retry `step` while the bus or the store is unavailable; report not-ready meanwhile."""
        delay = 0.05
        cap = self.settings.publish_retry_max_backoff_ms / 1000
        failures = 0
        while True:
            try:
                outcome = await step()
            except (BrokerUnavailable, StateUnavailable) as error:
                failures += 1
                self.metrics.checkpoint_failures.add(1, {"step": what})
                self._beat(ready=False)
                self.log.warning(f"{what} failed; retrying", error=str(error), failures=failures)
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(cap, delay * 2)
                continue
            if failures:
                self.log.info(f"{what} recovered", failures=failures)
                self._beat(ready=True)
            return outcome

    def _beat(self, *, ready: bool) -> None:
        if self.heartbeat is not None:
            self.heartbeat.beat(ready=ready)

    def _summary(self) -> dict[str, object]:
        summary: dict[str, object] = {
            name: getattr(self.stats, name)
            for name in ("received", "handled", "duplicates", "retries", "emitted", "acked")
        }
        summary["dead_lettered"] = dict(self.stats.dead_lettered)
        return summary


async def _finished_before(work: asyncio.Future[Any], stop: asyncio.Event) -> bool:
    """Wait until `work` is done or `stop` is set; True if `work` is done.

    If the caller is cancelled (a crash, in tests), `work` is cancelled with it: nothing
    may go on acking behind a loop that is gone.
    """
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        raise
    finally:
        stopping.cancel()
    return work.done()


def _cut_to_fit(dead_letter: OutboundMessage, limits: PublishLimits) -> OutboundMessage | None:
    """A refused dead letter cut to `limits`; one cut before and refused again (a bus
    taking less than it says) loses half its body each time, then is given up."""
    if DLQ_TRUNCATED not in dead_letter.headers:
        return limits.fit(dead_letter)
    if dead_letter.body:
        return limits.fit(dead_letter, body=len(dead_letter.body) // 2)
    return None


def _is_transient(error: BaseException) -> bool:
    """Retry handler errors, but never DeadLetter, and never cancellation (a stop or crash)."""
    return isinstance(error, Exception) and not isinstance(error, DeadLetter)
