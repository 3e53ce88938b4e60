"""The consume loop's lifecycle: fetch a batch, react to it, make the reaction durable,
then ack. A crash at any point before the ack redelivers the batch; dedupe and
deterministic emitted ids make the re-run harmless.

One event's path, each stage its own module (docs/design.md draws it):
fetch (`Broker.fetch_batch`) -> streams.py (restore, refresh) -> intake.py (decode, dedupe,
group by key) -> keystate.py -> dispatch.py (handler; retry.py, tracing.py) -> emitting.py
(emitted events and dead letters as messages) -> groupcommit.py (publishing.py, then one
`Checkpoint` per stream, then the ack) -> accounting.py (counts and logs)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from opentelemetry import metrics, trace

from . import telemetry
from .accounting import Accounting
from .brokers.base import Broker, BrokerUnavailable, InboundMessage
from .claimcheck import ClaimCheck
from .clock import Clock
from .config import Settings
from .dispatch import Dispatcher
from .emitting import Emitter
from .envelope import EnvelopeCodec
from .groupcommit import MAX_GROUP_MESSAGES, DurableSink, GroupCommit
from .health import Heartbeat
from .intake import Intake
from .keystate import MAX_STATE_BYTES, KeyStates
from .logs import get_logger
from .publishing import Publisher
from .reaction import Reaction
from .retry import Outages, RetryPolicy
from .router import Router
from .state.base import Conflict, Fenced, StateStore
from .stats import LoopStats
from .streams import Streams
from .tracing import tracing_for

__all__ = ["MAX_GROUP_MESSAGES", "MAX_STATE_BYTES", "ConsumerLoop", "LoopStats"]

LAG_INTERVAL_S = 5.0  # how often the bus is asked for consumer lag
OUTAGE_FIRST_BACKOFF_S = 0.05  # the first wait when the bus or the store is unavailable


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
        sink: DurableSink | None = None,
        claim_check: ClaimCheck | None = None,
    ) -> None:
        """With a `sink`, the loop archives instead of handling: every delivery of the
        broker's subscription is written to the sink before it is acked."""
        self.router = router
        self.sink = sink
        self.claim_check = claim_check  # large payloads in object storage (claimcheck.py)
        self.broker = broker
        self.state = state
        self.settings = settings
        self.heartbeat = heartbeat
        self.clock = Clock(wall=clock)
        self.stats = LoopStats()
        self.log = get_logger(service=settings.consumer_group)
        self.metrics = telemetry.LoopMetrics(meter_provider)
        self._lag_checked_at = -float("inf")
        outage_backoff = RetryPolicy(
            OUTAGE_FIRST_BACKOFF_S, settings.publish_retry_max_backoff_ms / 1000
        )
        self.outages = Outages(outage_backoff, self.log, self.metrics, self._beat)
        # The stages, in the order an event passes them.
        self.streams = Streams(
            state,
            settings,
            self.clock,
            self.outages,
            self.log,
            self.stats,
            exclusive=broker.exclusive_streams,
        )
        self.intake = Intake(codec, router, settings.max_message_bytes, settings.consumer_group)
        self.emitter = Emitter(settings, codec, broker)
        self.group_commit = GroupCommit(
            settings,
            broker,
            state,
            Publisher(settings, broker, self.log, claim_check),
            self.outages,
            self.metrics,
            self.clock,
            acked=self._acked,
            sink=sink,
        )
        self.key_states = KeyStates(router, state, self.outages, self.group_commit.settle)
        self.dispatcher = Dispatcher(
            settings,
            tracing_for(tracer_provider, broker, settings),
            self.log,
            self.stats,
            self.metrics,
            self.clock,
            metering=telemetry.metrics_enabled(meter_provider),
        )
        self.accounting = Accounting(
            self.stats, self.metrics, self.log, broker.unrouted_destination
        )
        # Set once the broker is connected and subscribed (tests and demos wait for it).
        self.started = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> LoopStats:
        """Consume until `stop` is set, then drain in-flight work within the deadline."""
        until_done = self.outages.until_done
        await until_done("open store", self.state.open)
        topics = [self.settings.topic_for(name) for name in self.router.event_types()]
        if self.sink is not None:
            topics = []  # the archiver: the broker's `pattern` subscribes
        await until_done("connect", partial(self.broker.start, topics, self.streams.forget))
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
                    elif self.group_commit.last_ended():
                        await self.group_commit.settle()  # a quiet bus: how did it end?
                except (Fenced, Conflict) as refused:
                    await self._rejoin(refused, topics)
            await self._drain(self.group_commit.settle())
        finally:
            await self.group_commit.abandon()  # a crash or cancellation: no ack behind our back
            await self.broker.close()
            await self.state.close()
            if self.heartbeat is not None:
                self.heartbeat.clear()
            self.log.info("stopped", **self.stats.summary())
        return self.stats

    async def _check_lag(self) -> None:
        """Refresh the consumer-lag gauge every LAG_INTERVAL_S; a bus that does not answer
        only leaves the last figures in place. A metric never stops the loop: an adapter's
        unexpected error is logged, not raised."""
        now = self.clock.monotonic()
        if now - self._lag_checked_at < LAG_INTERVAL_S:
            return
        self._lag_checked_at = now
        try:
            self.metrics.lag = await self.broker.lag()
        except BrokerUnavailable as error:
            self.log.debug("consumer lag unavailable", error=str(error))
        except Exception as error:
            self.log.warning("consumer lag check failed", error=f"{type(error).__name__}: {error}")

    async def _fetch_unless_stopped(self, stop: asyncio.Event) -> list[InboundMessage]:
        fetching = asyncio.ensure_future(self._fetch())
        if not await _finished_before(fetching, stop):
            fetching.cancel()  # nothing was delivered yet; close() returns anything that was
            await asyncio.gather(fetching, return_exceptions=True)
            return []
        return fetching.result()

    async def _fetch(self) -> list[InboundMessage]:
        """Up to BATCH_SIZE messages: once one arrived, keep filling until the next group
        may be written. Waiting longer would only delay the ack; handling sooner would
        only make smaller batches."""
        settings, next_write_at = self.settings, self.group_commit.next_write_at
        return await self.outages.until_done(
            "fetch",
            lambda: self.broker.fetch_batch(
                settings.batch_size, settings.batch_timeout_ms / 1000, next_write_at()
            ),
        )

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
        """Stopping: let `work` and the groups being made durable finish within the deadline."""
        try:
            async with asyncio.timeout(self.settings.drain_timeout_s):
                await work
                await self.group_commit.settle()
        except TimeoutError:
            self.log.warning("drain deadline passed; unacked messages will be redelivered")
        except Fenced as fenced:
            self.log.error("fenced while stopping; not acking", stream=fenced.stream)
        except Conflict as conflict:
            self.log.warning("key state conflict while stopping; not acking", why=str(conflict))

    async def _react_then_make_durable(self, batch: Sequence[InboundMessage]) -> None:
        await self.group_commit.add(batch, await self._react(batch))

    async def _react(self, batch: Sequence[InboundMessage]) -> Reaction:
        """Everything before durability: the stages from stream state to outbound."""
        self.stats.batches += 1
        self.stats.received += len(batch)
        self.metrics.batch_size.record(len(batch))
        streams = {message.stream for message in batch}
        await self.streams.restore(streams)
        await self.streams.refresh({message.stream for message in batch if message.redelivered})
        # Fences taken now: a rebalance may forget a stream while its batch is made durable.
        reaction = Reaction(
            fences={stream: self.streams[stream].fence for stream in streams},
            recorded_at=self.clock.wall(),
        )
        if self.sink is not None:
            return reaction  # the sink takes the messages themselves
        if self.claim_check is not None:
            batch = await self.claim_check.resolve(batch, reaction, self.outages)
        work = self.intake.decode_and_dedupe(batch, self.streams, reaction)
        # Let the last group's write take its next round trip (store, then bus) before
        # handling keeps the event loop busy: its ack then waits less.
        await asyncio.sleep(0)
        slots = await self.key_states.load(work, self.streams)
        await self.dispatcher.handle_all(work, slots, reaction)
        self.key_states.keep(slots, reaction)
        self.emitter.collect(reaction)
        self.streams.known_before_durable(reaction)
        return reaction

    def _acked(self, acked: int, reaction: Reaction) -> None:
        """A group is durable and acked."""
        self.streams.durable(reaction)
        self.accounting.acked(acked, reaction)

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
        await self.group_commit.abandon()
        await self.broker.close()
        self.streams.forget()
        start = partial(self.broker.start, topics, self.streams.forget)
        await self.outages.until_done("connect", start)

    def _beat(self, ready: bool) -> None:
        if self.heartbeat is not None:  # read each time: tests swap it
            self.heartbeat.beat(ready=ready)


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
