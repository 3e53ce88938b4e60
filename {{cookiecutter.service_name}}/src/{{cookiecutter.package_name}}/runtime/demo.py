"""A scripted stream through the real loop on the memory bus: what the guarantees look like."""

from __future__ import annotations

from google.protobuf import wrappers_pb2
from google.protobuf.message import Message

from .envelope import CloudEventsProtobufCodec, Envelope, TypeRegistry, new_event_id
from .router import Router
from .testing import TEST_SOURCE, ServiceHarness


async def run_demo(router: Router, samples: list[tuple[Message, str]]) -> str:
    """Publish `samples` (event, key) with a duplicate, an unknown type, poison and an
    oversized message, simulate a short bus outage, run the loop until idle, and return
    a printable report."""
    if not samples:
        raise ValueError("the demo needs at least one sample event")
    service = ServiceHarness(router, max_message_bytes=64 * 1024)
    topic = service.settings.topic_for(router.event_types()[0])
    ids = [await service.publish(event, key=key) for event, key in samples]
    first_event, first_key = samples[0]
    await service.publish(first_event, key=first_key, event_id=ids[0])  # a producer retried
    foreign = Envelope(
        id=new_event_id(),
        type="com.example.billing.InvoicePaid",
        source=TEST_SOURCE,
        payload=wrappers_pb2.StringValue(value="invoice-7"),
    )
    service.publish_raw(CloudEventsProtobufCodec(TypeRegistry()).encode(foreign), topic)
    service.publish_raw(b"\x00\xffthis is not protobuf", topic)
    service.publish_raw(b"x" * (65 * 1024), topic)
    published = len(samples) + 4

    outage = 2  # the bus refuses the loop's first publishes, as during a broker restart
    service.bus.fail_next_publishes(outage)
    stats = await service.run_until_idle()
    lines = [
        f"published {published} messages to the memory bus "
        f"({len(samples)} events, 1 duplicate, 1 unknown type, 1 poison, 1 oversized)",
        f"handled: {stats.handled}",
        f"duplicates dropped: {stats.duplicates}",
        f"retries: {stats.retries}",
        f"bus outage: {outage} publishes refused; retried, nothing acked until confirmed",
        f"dead-lettered: {sum(stats.dead_lettered.values())}",
    ]
    lines += [f"  - {parked.reason}: {parked.error}" for parked in service.dead_letters]
    emitted = service.emitted()
    lines.append(f"emitted: {len(emitted)}")
    lines += [
        f"  - {envelope.type} id={envelope.id} caused by {envelope.extensions['causationid']}"
        for envelope in emitted
    ]
    lines.append(f"acked: {stats.acked} of {published}; nothing left on the bus")
    return "\n".join(lines)
