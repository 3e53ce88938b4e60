"""Steps run at once whose failure must not race a retry (template-owned)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import TypeVar, cast

T = TypeVar("T")


async def all_or_raise(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Every call's result, run at once; raises the first failure once all have ended (a
    retry never races a call still in flight)."""
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return cast(list[T], outcomes)
