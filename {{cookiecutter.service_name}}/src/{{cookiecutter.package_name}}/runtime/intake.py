"""Decode and dedupe a batch, and group what must be handled by (stream, key)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from itertools import groupby
from operator import attrgetter

from .brokers.base import CONTENT_TYPE_HEADER, DeadLetterRecord, InboundMessage
from .dedupe import REDRIVE_HEADER, digest, redriven_id
from .envelope import EnvelopeCodec
from .errors import UndecodableEvent
from .modes import ContentModes
from .reaction import Reaction, Work
from .router import Router
from .streams import Streams

# Each key's events in the batch's order; keys are handled concurrently.
WorkByKey = dict[tuple[str, str], list[Work]]


class Intake:
    def __init__(
        self, codec: EnvelopeCodec, router: Router, max_message_bytes: int, group: str
    ) -> None:
        self.codec = codec
        self.modes = ContentModes(codec)  # CloudEvents from other producers
        self.router = router
        self.max_message_bytes = max_message_bytes
        self.group = group  # a redriven copy is new to the group it was redriven for

    def decode_and_dedupe(
        self, batch: Sequence[InboundMessage], streams: Streams, reaction: Reaction
    ) -> WorkByKey:
        """What must be handled, by (stream, key), in order; bad input and unknown types
        become dead letters, duplicates are counted. Stream-wide lookups are made once per
        run of one stream's messages (a partition's messages come together)."""
        work: WorkByKey = defaultdict(list)
        max_bytes, decode, handler_of = self.max_message_bytes, self.codec.decode, self.router.get
        group, decode_other = self.group, self.modes.decode
        content_type, native = CONTENT_TYPE_HEADER, self.codec.content_type
        seen_in_batch: dict[str, set[bytes]] = defaultdict(set)
        for stream, run in groupby(batch, key=attrgetter("stream")):
            state = streams[stream]
            messages = state.not_checkpointed(run, reaction)
            known, seen = state.window.has, seen_in_batch[stream]
            processed, digests = reaction.processed[stream], reaction.digests[stream]
            for message in messages:
                body = message.body
                if len(body) > max_bytes:
                    size = f"{len(body)} bytes > {max_bytes}"
                    reaction.dead.append(DeadLetterRecord(message, "oversized", size))
                    continue
                try:
                    # This service's own content type goes straight to the codec, for one
                    # header lookup; runtime/modes.py tells every other mode apart.
                    envelope = (
                        decode(body)
                        if message.headers.get(content_type) == native
                        else decode_other(message)
                    )
                except UndecodableEvent as error:
                    reaction.dead.append(DeadLetterRecord(message, error.reason, error.detail))
                    continue
                event_id = envelope.id
                if REDRIVE_HEADER in message.headers:  # an operator asked for a re-run
                    event_id = redriven_id(event_id, message.headers[REDRIVE_HEADER], group)
                event_digest = digest(event_id)
                if known(event_digest) or event_digest in seen:
                    reaction.duplicates += 1
                    continue
                seen.add(event_digest)
                processed.append(event_id)
                digests.append(event_digest)
                spec = handler_of(envelope.type)
                if spec is None or envelope.payload is None:
                    reaction.dead.append(DeadLetterRecord(message, "unknown-type", envelope.type))
                    continue
                key = envelope.subject or message.key or envelope.id
                work[stream, key].append(Work(message, envelope, spec, event_id))
        return work
