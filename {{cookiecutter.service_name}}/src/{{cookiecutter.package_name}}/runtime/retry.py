"""One retry policy, for handlers (RetryLater and other errors) and for the bus and the
store while they are unavailable: exponential backoff with full jitter."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from .brokers.base import BrokerUnavailable
from .objectstore import ObjectStoreUnavailable
from .state.base import StateUnavailable
from .telemetry import LoopMetrics

T = TypeVar("T")
UNAVAILABLE = (BrokerUnavailable, StateUnavailable, ObjectStoreUnavailable)


class RetryPolicy:
    """The wait after the n-th failure is drawn between 0 and `initial_s` x 2^(n-1),
    capped at `max_s`; at most `attempts` attempts (None: until one succeeds)."""

    def __init__(self, initial_s: float, max_s: float, attempts: int | None = None) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.attempts = attempts

    def delay(self, failures: int) -> float:
        return random.uniform(0, min(self.max_s, self.initial_s * 2 ** (failures - 1)))

    async def run(
        self,
        attempt: Callable[[int], Awaitable[T]],
        failed: Exception,
        retries: Callable[[Exception], bool],
        on_retry: Callable[[int, Exception, float], None],
    ) -> T:
        """Attempt 1 failed with `failed`: wait, then `attempt(number)` from 2 on until it
        returns. An error `retries` refuses, or the last attempt's, is raised;
        `on_retry(failed attempt's number, its error, delay)` is told before each wait.
        (Callers run attempt 1 themselves: success pays for nothing here.)"""
        number, error = 1, failed
        while True:
            if not retries(error) or (self.attempts is not None and number >= self.attempts):
                raise error
            delay = self.delay(number)
            on_retry(number, error, delay)
            await asyncio.sleep(delay)
            number += 1
            try:
                return await attempt(number)
            except Exception as caught:
                error = caught


class Outages:
    """Steps on the bus or the store, retried for as long as either is unavailable; the
    service reports itself not ready meanwhile."""

    def __init__(
        self,
        policy: RetryPolicy,
        log: structlog.typing.FilteringBoundLogger,
        metrics: LoopMetrics,
        beat: Callable[[bool], None],
    ) -> None:
        self.policy = policy
        self.log = log
        self.metrics = metrics
        self.beat = beat

    async def until_done(self, what: str, step: Callable[[], Awaitable[T]]) -> T:
        try:
            return await step()
        except UNAVAILABLE as error:
            failed = error
        failures = 0

        def on_retry(number: int, error: Exception, _delay: float) -> None:
            nonlocal failures
            failures = number
            self.metrics.checkpoint_failures.add(1, {"step": what})
            self.beat(False)
            self.log.warning(f"{what} failed; retrying", error=str(error), failures=number)

        outcome = await self.policy.run(
            lambda _: step(), failed, lambda error: isinstance(error, UNAVAILABLE), on_retry
        )
        self.log.info(f"{what} recovered", failures=failures)
        self.beat(True)
        return outcome
