"""Crash-test handlers, copied over a baked service's handlers.py by tests/test_crash.py.

Each handled event id is appended to $CRASH_TEST_LOG and fsynced before the handler
returns, so the log is the ground truth of what ran, whatever instant the kill hits.
Each line also carries the key's event count kept in `ctx.state`: however often an event
re-runs, the committed count must grow by exactly one per distinct event.
"""

from __future__ import annotations

import asyncio
import os

from google.protobuf.message import Message

from .events.orders_pb2 import OrderPlaced
from .runtime import Context, Router

router = Router()


@router.handles(OrderPlaced, stateful=True)
async def record(event: OrderPlaced, ctx: Context) -> None:
    ctx.state["count"] = ctx.state.get("count", 0) + 1
    # Some work per event widens the window in which a kill finds a batch in flight.
    await asyncio.sleep(float(os.environ.get("CRASH_HANDLER_DELAY_S", "0")))
    descriptor = os.open(os.environ["CRASH_TEST_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(descriptor, f"{ctx.event_id} {ctx.state['count']}\n".encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def demo_events() -> list[tuple[Message, str]]:
    return [(OrderPlaced(order_id="o-1", quantity=1), "o-1")]
