"""Your event handlers: one async function per event type. This is the file you edit.

A handler reacts to one event. Emit follow-up events with ``ctx.emit``: they are
published (and confirmed by the bus) only after the handler returns, and only then is
the incoming event acknowledged. Raise ``RetryLater`` for a transient failure (retried
with backoff, then dead-lettered) or ``DeadLetter`` to park the event now. A handler may
run again for the same event after a crash, so keep side effects idempotent.

``stateful=True`` gives a handler ``ctx.state``: a dict of JSON values per event key,
committed together with the checkpoint, so it is never half-applied or applied twice.
"""

from __future__ import annotations

from google.protobuf.message import Message

from .events.orders_pb2 import OrderCancelled, OrderPlaced, StockReleased, StockReserved
from .runtime import Context, DeadLetter, Router

router = Router()


@router.handles(OrderPlaced, stateful=True)
async def reserve_stock(event: OrderPlaced, ctx: Context) -> None:
    if event.quantity <= 0:
        raise DeadLetter("invalid-quantity", f"order {event.order_id} asks for {event.quantity}")
    ctx.log.debug("reserving stock", order_id=event.order_id, sku=event.sku)
    ctx.state["reserved"] = {"sku": event.sku, "quantity": event.quantity}
    ctx.emit(
        StockReserved(order_id=event.order_id, sku=event.sku, quantity=event.quantity),
        key=event.order_id,
    )


@router.handles(OrderCancelled, stateful=True)
async def release_stock(event: OrderCancelled, ctx: Context) -> None:
    reserved = ctx.state.pop("reserved", None)
    ctx.log.info("order cancelled", order_id=event.order_id, reason=event.reason)
    if reserved is None:
        return  # nothing reserved for this order (or already released)
    ctx.emit(
        StockReleased(order_id=event.order_id, sku=reserved["sku"], quantity=reserved["quantity"]),
        key=event.order_id,
    )


def demo_events() -> list[tuple[Message, str]]:
    """Sample (event, key) pairs that `{{ cookiecutter.service_name }} demo` publishes."""
    return [
        (OrderPlaced(order_id="o-1", sku="sku-apple", quantity=2), "o-1"),
        (OrderPlaced(order_id="o-2", sku="sku-pear", quantity=1), "o-2"),
        (OrderPlaced(order_id="o-3", sku="sku-fig", quantity=0), "o-3"),
        (OrderCancelled(order_id="o-2", reason="changed my mind"), "o-2"),
    ]
