"""Claim-check: an emitted event whose body is larger than CLAIM_CHECK_THRESHOLD_BYTES
travels without its payload. The payload (the packed `Any`) is stored once in the object
store (ARCHIVE_URL's, under `claims/<sha256>`), and the envelope carries a pointer: the
CloudEvents `dataref` attribute (the object's URL) and `datadigest` (`sha256:<hex>`).
The message gets the header `x-claim-check`, so consumers look only at those.

A consuming loop puts the payload back before decoding: the object is fetched (at most
CLAIM_CHECK_MAX_BYTES), its digest verified, the body rebuilt as it was. A missing,
corrupt or too large object is dead-lettered with its reason; an unavailable store is
retried (not ready meanwhile), never acked past.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace

from google.protobuf.message import DecodeError
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..events import cloudevents_pb2
from .brokers.base import DeadLetterRecord, InboundMessage, OutboundMessage
from .config import ENV_PREFIX, load_model
from .objectstore import ObjectNotFound, ObjectStore
from .reaction import Reaction
from .retry import Outages

HEADER = "x-claim-check"
DATAREF = "dataref"
DIGEST = "datadigest"
PREFIX = "claims/"


class ClaimCheckSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    claim_check_threshold_bytes: int = Field(
        0, ge=0, description="Emitted bodies larger than this go to ARCHIVE_URL (0: never)"
    )
    claim_check_max_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="Largest claim-checked payload a consumer fetches"
    )


def load_claim_check_settings() -> ClaimCheckSettings:
    return load_model(ClaimCheckSettings)


class ClaimCheck:
    def __init__(self, store: ObjectStore, settings: ClaimCheckSettings) -> None:
        self.store = store
        self.threshold = settings.claim_check_threshold_bytes
        self.max_bytes = settings.claim_check_max_bytes

    async def check_out(
        self, messages: Sequence[OutboundMessage], outages: Outages
    ) -> list[OutboundMessage]:
        """`messages` with each large emitted event's payload stored and replaced by a
        pointer (dead letters keep their bytes: they are parked as they came)."""
        threshold = self.threshold
        sent = list(messages)
        for index, message in enumerate(sent):
            if threshold and len(message.body) > threshold and not message.dead_letter:
                sent[index] = await self._check_out(message, outages)
        return sent

    async def _check_out(self, message: OutboundMessage, outages: Outages) -> OutboundMessage:
        event = cloudevents_pb2.CloudEvent.FromString(message.body)
        if event.WhichOneof("data") != "proto_data":
            return message  # not ours to move (no protobuf payload)
        data = event.proto_data.SerializeToString()
        digest = hashlib.sha256(data).hexdigest()
        path = PREFIX + digest
        await outages.until_done("claim-check", lambda: self.store.put(path, data))
        event.ClearField("proto_data")
        event.attributes[DATAREF].ce_uri_ref = f"{self.store.url.rstrip('/')}/{path}"
        event.attributes[DIGEST].ce_string = f"sha256:{digest}"
        headers = {**message.headers, HEADER: "1"}
        return replace(message, body=event.SerializeToString(), headers=headers)

    async def resolve(
        self, batch: Sequence[InboundMessage], reaction: Reaction, outages: Outages
    ) -> Sequence[InboundMessage]:
        """The batch with claim-checked payloads put back; a message whose payload cannot
        be had is left out and dead-lettered in `reaction`."""
        if not any(HEADER in message.headers for message in batch):
            return batch
        kept = []
        for message in batch:
            if HEADER in message.headers:
                why = await self._resolve(message, outages)
                if why is not None:
                    reaction.dead.append(DeadLetterRecord(message, *why))
                    continue
            kept.append(message)
        return kept

    async def _resolve(self, message: InboundMessage, outages: Outages) -> tuple[str, str] | None:
        """Put the payload back into `message.body`; (reason, detail) when it cannot."""
        try:
            event = cloudevents_pb2.CloudEvent.FromString(message.body)
        except DecodeError as error:
            return "undecodable", f"not a CloudEvent protobuf: {error}"
        if DATAREF not in event.attributes or DIGEST not in event.attributes:
            return "claim-check-invalid", f"{HEADER} without {DATAREF} and {DIGEST}"
        reference = event.attributes[DATAREF].ce_uri_ref
        expected = event.attributes[DIGEST].ce_string.removeprefix("sha256:")
        path = PREFIX + reference.rpartition("/")[2]
        try:
            size = await outages.until_done("claim-check", lambda: self.store.size(path))
            if size > self.max_bytes:  # not fetched at all
                return "claim-check-oversized", f"{size} bytes > {self.max_bytes}"
            data = await outages.until_done("claim-check", lambda: self.store.get(path))
        except ObjectNotFound:
            return "claim-check-missing", f"no object at {reference}"
        if hashlib.sha256(data).hexdigest() != expected:
            return "claim-check-corrupt", f"{reference} does not match its digest"
        try:
            event.proto_data.ParseFromString(data)
        except DecodeError as error:
            return "claim-check-corrupt", f"{reference}: {error}"
        del event.attributes[DATAREF]
        del event.attributes[DIGEST]
        message.body = event.SerializeToString()
        return None
