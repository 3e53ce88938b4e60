"""Two baked services in one process, chained on the memory bus, one trace end to end.

Run with the interpreter of a venv holding both `order_service` (baked with the template's
sample handlers) and `billing_service`. A client publishes OrderPlaced with a trace
context; order-service's `reserve_stock` emits StockReserved; billing-service handles
it. The in-memory exporter must hold one trace: client -> A consumer -> A producer ->
B consumer, with the messaging attributes. Prints the spans as JSON; exits non-zero on a
broken chain.
"""

from __future__ import annotations

import asyncio
import json
import sys

from billing_service.runtime import Context as BillingContext
from billing_service.runtime import Router as BillingRouter
from billing_service.runtime.testing import ServiceHarness as BillingHarness
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from order_service.events.orders_pb2 import OrderPlaced, StockReserved
from order_service.handlers import router as order_router
from order_service.runtime.testing import ServiceHarness as OrderHarness

FAST = {"batch_timeout_ms": 5, "commit_interval_ms": 1}


def only(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [span for span in spans if span.name == name]
    if len(found) != 1:
        raise SystemExit(f"expected one span {name!r}, found {len(found)}")
    return found[0]


async def main() -> dict[str, object]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)

    billed: list[str] = []
    billing_router = BillingRouter()

    @billing_router.handles(StockReserved)  # order-service's schema, shared
    async def bill(event: StockReserved, ctx: BillingContext) -> None:
        billed.append(event.order_id)

    orders = OrderHarness(
        order_router, consumer_group="order-service", event_source="urn:order-service", **FAST
    )
    billing = BillingHarness(
        billing_router, consumer_group="billing-service", event_source="urn:billing", **FAST
    )
    with trace.get_tracer("client").start_as_current_span("client", kind=SpanKind.PRODUCER):
        headers: dict[str, str] = {}
        propagate.inject(headers)
        await orders.publish(
            OrderPlaced(order_id="o-1", sku="s", quantity=1), key="o-1", headers=headers
        )
    await orders.run_until_idle()
    # The bus between them: what order-service published is delivered to billing-service.
    topic = billing.settings.topic_for("order_service.events.StockReserved")
    for message in orders.bus.published:
        if message.topic == topic:
            billing.publish_raw(message.body, topic, key=message.key, headers=dict(message.headers))
    await billing.run_until_idle()

    spans = list(exporter.get_finished_spans())
    client = only(spans, "client")
    consume_a = only(spans, "process order_service.events.OrderPlaced")
    produce_a = only(spans, f"send {topic}")
    consume_b = only(spans, f"process {topic}")
    chain = [client, consume_a, produce_a, consume_b]
    problems = []
    if billed != ["o-1"]:
        problems.append(f"billing-service handled {billed}")
    if len({span.context.trace_id for span in chain}) != 1:
        problems.append("the spans are not in one trace")
    for child, parent in zip(chain[1:], chain[:-1], strict=True):
        if child.parent is None or child.parent.span_id != parent.context.span_id:
            problems.append(f"{child.name} is not a child of {parent.name}")
    attributes = dict(consume_b.attributes or {})
    expected = {
        "messaging.consumer.group.name": "billing-service",
        "messaging.destination.name": topic,
        "cloudevents.event_source": "urn:order-service",
        "cloudevents.event_subject": "o-1",
    }
    problems += [
        f"{name}={attributes.get(name)!r}, wanted {value!r}"
        for name, value in expected.items()
        if attributes.get(name) != value
    ]
    report = {
        "spans": [
            {
                "name": span.name,
                "kind": span.kind.name,
                "parent": None if span.parent is None else format(span.parent.span_id, "016x"),
                "span_id": format(span.context.span_id, "016x"),
            }
            for span in chain
        ],
        "trace_id": format(client.context.trace_id, "032x"),
        "problems": problems,
    }
    return report


if __name__ == "__main__":
    result = asyncio.run(main())
    print(json.dumps(result))  # the last line; the services log above it
    sys.exit(1 if result["problems"] else 0)
