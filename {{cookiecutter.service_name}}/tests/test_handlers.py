"""Tests of your handlers, through the real loop on the in-memory bus. Yours to edit."""

from {{ cookiecutter.package_name }}.events.orders_pb2 import (
    OrderCancelled,
    OrderPlaced,
    StockReleased,
    StockReserved,
)
from {{ cookiecutter.package_name }}.runtime.testing import ServiceHarness


async def test_order_placed_reserves_stock(service: ServiceHarness) -> None:
    await service.publish(OrderPlaced(order_id="o-1", sku="sku-apple", quantity=2), key="o-1")

    await service.run_until_idle()

    [reserved] = service.payloads(StockReserved)
    assert (reserved.order_id, reserved.sku, reserved.quantity) == ("o-1", "sku-apple", 2)
    assert await service.state_of("o-1") == {"reserved": {"sku": "sku-apple", "quantity": 2}}
    assert service.dead_letters == []


async def test_order_with_no_quantity_is_dead_lettered(service: ServiceHarness) -> None:
    await service.publish(OrderPlaced(order_id="o-2", sku="sku-pear", quantity=0), key="o-2")

    await service.run_until_idle()

    assert [parked.reason for parked in service.dead_letters] == ["invalid-quantity"]
    assert service.emitted() == []
    assert await service.state_of("o-2") == {}


async def test_cancellation_releases_what_was_reserved(service: ServiceHarness) -> None:
    await service.publish(OrderPlaced(order_id="o-3", sku="sku-fig", quantity=5), key="o-3")
    await service.run_until_idle()  # a restart in between: the state is in the store
    await service.publish(OrderCancelled(order_id="o-3", reason="changed my mind"), key="o-3")
    await service.publish(OrderCancelled(order_id="o-3", reason="clicked twice"), key="o-3")

    await service.run_until_idle()

    [released] = service.payloads(StockReleased)
    assert (released.order_id, released.sku, released.quantity) == ("o-3", "sku-fig", 5)
    assert await service.state_of("o-3") == {}


async def test_cancellation_without_reservation_emits_nothing(service: ServiceHarness) -> None:
    await service.publish(OrderCancelled(order_id="o-4", reason="changed my mind"), key="o-4")

    stats = await service.run_until_idle()

    assert stats.handled == 1
    assert service.emitted() == []
